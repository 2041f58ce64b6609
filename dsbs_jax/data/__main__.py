"""Data preparation commands: `python -m dsbs_jax.data <command> ...`.

    prepare    official archive (<source>/<name>/...) -> canonical cache <out>/<name>/
               + its SentencePiece vocabulary <out>/<name>/spm.model (an existing one is kept)
    synthetic  the built-in word-problem dataset + its SentencePiece vocabulary
    vocab      (re)train a cache's SentencePiece vocabulary on its train split
    tfds       build a canonical cache as a TFDS dataset (TFRecord shards)

Bad input (a missing directory, an unreadable file) ends with one line on
stderr naming the path, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dsbs_jax.data import cache, prepare, vocab
from dsbs_jax.data.official import DATASETS
from dsbs_jax.errors import MissingFileError, UserError


def _prepare(args: argparse.Namespace) -> None:
    summaries = prepare.prepare_official(args.source, args.dataset, args.out)
    print(prepare.format_summaries(args.dataset, summaries))
    out_dir = Path(args.out) / args.dataset
    print(f"wrote {out_dir}")
    if not args.no_vocab:
        print(vocab.write_dataset_vocab(out_dir, args.vocab_size))


def _synthetic(args: argparse.Namespace) -> None:
    from dsbs_jax.data import synthetic

    config = synthetic.SyntheticConfig(
        num_train=args.num_train,
        num_valid=args.num_valid,
        num_test=args.num_test,
        seed=args.seed,
        teacher_error_rate=args.teacher_error_rate,
        max_steps=args.max_steps,
    )
    summaries, model = prepare.write_synthetic(args.out, config, args.vocab_size)
    print(prepare.format_summaries(synthetic.DATASET_NAME, summaries))
    print(f"wrote {model.parent} (vocabulary {model})")


def _vocab(args: argparse.Namespace) -> None:
    if not cache.available_splits(args.cache):
        raise MissingFileError(f"no <split>.jsonl teacher cache files in {args.cache}")
    old = Path(args.cache) / vocab.VOCAB_FILENAME
    before = old.read_bytes() if old.is_file() else None
    model = vocab.train_vocab_for_cache(args.cache, args.vocab_size, vocab.DATASET_VOCAB_SPLITS)
    if before is None:
        print(f"wrote {model}")
    elif before == model.read_bytes():
        print(f"wrote {model} (the same as the one it replaced)")
    else:
        print(f"wrote {model}, replacing a different one: models trained with that no longer match")


def _tfds(args: argparse.Namespace) -> None:
    from dsbs_jax.data import tfds_cache

    if not cache.available_splits(args.cache):
        raise MissingFileError(f"no <split>.jsonl teacher cache files in {args.cache}")
    name = tfds_cache.build_tfds(args.cache, args.name, args.data_dir, num_shards=args.num_shards)
    print(f"built {name} in {args.data_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsbs_jax.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="convert the official archive to a canonical cache")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--source", required=True, help="folder holding <dataset>/<dataset>_*.json")
    p.add_argument("--out", required=True, help="cache root; writes <out>/<dataset>/")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=vocab.DATASET_VOCAB_SIZE,
        help="most pieces of the vocabulary trained on the train split",
    )
    p.add_argument(
        "--no-vocab",
        action="store_true",
        help="write no vocabulary (runs on the dataset then need VOCABULARY_PATH)",
    )
    p.set_defaults(run=_prepare)

    p = commands.add_parser("synthetic", help="write the built-in dataset and its vocabulary")
    p.add_argument("--out", required=True, help="cache root; writes <out>/synthetic/")
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-valid", type=int, default=200)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-error-rate", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=2, help="most reasoning steps a problem takes")
    p.add_argument("--vocab-size", type=int, default=prepare.SYNTHETIC_VOCAB_SIZE)
    p.set_defaults(run=_synthetic)

    p = commands.add_parser("vocab", help="(re)train a cache's vocabulary on its train split")
    p.add_argument("--cache", required=True, help="a canonical cache folder (<split>.jsonl)")
    p.add_argument("--vocab-size", type=int, default=vocab.DATASET_VOCAB_SIZE)
    p.set_defaults(run=_vocab)

    p = commands.add_parser("tfds", help="build a cache as a TFDS dataset of TFRecord shards")
    p.add_argument("--cache", required=True, help="a canonical cache folder (<split>.jsonl)")
    p.add_argument("--name", required=True, help="dataset name, the TFDS config name")
    p.add_argument("--data-dir", required=True, help="TFDS data_dir to write into")
    p.add_argument("--num-shards", type=int, default=None, help="shards per split (>= hosts)")
    p.set_defaults(run=_tfds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:  # OfficialDataError, CacheFormatError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
