"""Converts pretrained T5 weights between Hugging Face, t5x and our own checkpoints.

    python -m dsbs_jax.convert --from PATH --to OUT_DIR --format {ours,hf,t5x}

`--format ours` reads a Hugging Face T5 directory, a t5x checkpoint or one of ours and writes
OUT_DIR as a MODEL_DIR with one checkpoint, `OUT_DIR/checkpoint_<step>/`, whose `state` item
holds `{"params": ...}` only (no optimizer state: a starting point, not a run to resume).
`--format hf` writes `config.json` + `model.safetensors` that
`transformers.T5ForConditionalGeneration.from_pretrained(OUT_DIR)` loads. `--format t5x` writes
OUT_DIR as a t5x MODEL_DIR, `OUT_DIR/checkpoint_<step>/state/` in t5x's orbax layout (parameters
and step, no optimizer state), which t5x's finetune.gin restores as INITIAL_CHECKPOINT_PATH and
t5x.eval as CHECKPOINT_PATH (see docs/t5x.md), and prints the `network.T5Config` gin block
that t5x's T5 network needs to hold it (t5x's model gins say vocab_size 32128, for one).

The step is the source's: a t5x or our checkpoint at step N (its `checkpoint_N` directory, or a
MODEL_DIR's latest) becomes `checkpoint_N`, so t5x resumes counting from N; a Hugging Face
directory has no step and becomes `checkpoint_0`.

A t5x checkpoint read here is either format t5x writes: orbax (`checkpoint_<step>/state/`,
current t5x) or legacy msgpack + TensorStore (the public gs://t5-data checkpoints).

Model sizes come from the Hugging Face `config.json`; for t5x and our checkpoints from
`--preset` (with `--vocab_size`), or else they are inferred from the parameter shapes. Parameters
are converted in float32. Bad input ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

from dsbs_jax import checkpoint_import, t5x_checkpoints
from dsbs_jax.checkpoints import PARAMS_KEY, STEP_PREFIX, Checkpointer
from dsbs_jax.errors import UserError
from dsbs_jax.models.t5 import PRESETS, T5Config, get_config
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.state import Student

_USAGE_ERROR = 2
_PRESETS = [name for name in PRESETS if name != "tiny"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsbs_jax.convert",
        description="Convert T5 weights: Hugging Face / t5x / ours -> ours or Hugging Face.",
    )
    parser.add_argument("--from", dest="source", required=True, help="checkpoint to read")
    parser.add_argument("--to", dest="out_dir", required=True, help="new or empty directory")
    parser.add_argument(
        "--format", required=True, choices=["ours", "hf", "t5x"], help="what to write"
    )
    parser.add_argument("--preset", choices=_PRESETS, help="T5 1.1 size of a t5x or our checkpoint")
    parser.add_argument("--vocab_size", type=int, help="vocabulary size with --preset")
    return parser


def source_config(source: str, preset: str | None, vocab_size: int | None) -> T5Config:
    """The float32 model config for `source`: its config.json, the preset, or its shapes."""
    overrides = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if preset is None:
        return checkpoint_import.checkpoint_config(source, **overrides)
    if checkpoint_import.checkpoint_format(source) == "hf":
        raise checkpoint_import.CheckpointImportError(
            "--preset is for t5x and our checkpoints; a Hugging Face config.json gives the sizes"
        )
    return get_config(preset, **overrides)


def convert(source: str, out_dir: str, fmt: str, config: T5Config) -> Path:
    """Loads `source` into `config`'s parameters and writes them to `out_dir` as `fmt`, at the
    source's step (0 without one)."""
    student = Student(config, Partitioner())
    params = checkpoint_import.load_params(source, config, student.param_shardings)
    if fmt == "hf":
        return checkpoint_import.export_hf(params, config, out_dir)
    step = checkpoint_import.checkpoint_step(source) or 0
    if fmt == "t5x":
        return t5x_checkpoints.write_t5x_checkpoint(params, out_dir, step)
    with Checkpointer(out_dir) as checkpointer:
        # The model's dimensions go with it, so eval names a config that does not match.
        checkpointer.save(step, {PARAMS_KEY: params}, student.record(), force=True)
    return Path(out_dir) / f"{STEP_PREFIX}_{step}"


def _check_out_dir(out_dir: str) -> None:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise checkpoint_import.CheckpointImportError(f"--to {out_dir} exists and is not empty")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_out_dir(args.out_dir)
        config = source_config(args.source, args.preset, args.vocab_size)
        written = convert(args.source, args.out_dir, args.format, config)
    except (UserError, OSError) as error:
        print(f"dsbs_jax.convert: error: {error}", file=sys.stderr)
        return _USAGE_ERROR
    print(f"wrote {written} ({args.format} format)")
    if args.format == "t5x":
        print("t5x's network for it, after t5x's model gin (docs/t5x.md):")
        print(t5x_checkpoints.network_gin(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
