"""Our tasks, loss and checkpoints inside a real t5x install, with t5x's own gin files.

t5x is not on PyPI; install it from its sources next to our pins (docs/t5x.md) and run
these with that environment's pytest. Without t5x they skip. One tiny t5x run (t5x's
tiny.gin, vocabulary and lengths shrunk by gin overrides) is shared by the tests: it
starts from a checkpoint `convert --format t5x` wrote, then t5x.eval and t5x.infer read
what it trained.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("t5x.train", reason="t5x is not installed (not on PyPI; see docs/t5x.md)")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
from flax import traverse_util  # noqa: E402
from t5x import adafactor  # noqa: E402
from t5x import losses as t5x_losses  # noqa: E402
from t5x.examples.t5 import network  # noqa: E402

from dsbs_jax import checkpoint_import, t5x_checkpoints  # noqa: E402
from dsbs_jax.data import registration  # noqa: E402
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter  # noqa: E402
from dsbs_jax.losses import step_by_step_loss  # noqa: E402
from dsbs_jax.models.t5 import T5, T5Config  # noqa: E402
from dsbs_jax.partitioning import Partitioner  # noqa: E402
from dsbs_jax.t5x_models import StepByStepEncoderDecoderModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 128  # the conftest cache's vocabulary
MIXTURE = registration.mixture_name("synthetic", "step_by_step")
LABEL_TASK = "dsbs_synthetic_label_llm"
LENGTHS = {"inputs": 64, "targets": 64}
# t5x/examples/t5/t5_1_1/tiny.gin's network, in float32 and our vocabulary.
TINY = dict(
    emb_dim=8, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, head_dim=3, mlp_dim=16
)
TRAIN_STEPS, EVAL_PERIOD = 6, 3
RUN_FILES = sorted((REPO / "gin_configs" / "dsbs_t5x" / "runs").glob("*.gin"))


def _t5x(program: str, run_gin: str, cache_root: Path, *bindings: str) -> None:
    """Runs `python -m t5x.<program>` with t5x's tiny.gin, `run_gin` and ours."""
    command = [
        sys.executable,
        "-m",
        f"t5x.{program}",
        f"--gin_search_paths={REPO / 'gin_configs'}",
        "--gin_file=t5x/examples/t5/t5_1_1/tiny.gin",
        f"--gin_file=t5x/configs/runs/{run_gin}",
        *bindings,
        f'--gin.MIXTURE_OR_TASK_NAME="{MIXTURE}"',
        f'--gin.DATA_DIR="{cache_root}"',
        f"--gin.network.T5Config.vocab_size={VOCAB_SIZE}",
        "--gin.network.T5Config.dtype='float32'",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _our_config() -> T5Config:
    return T5Config(vocab_size=VOCAB_SIZE, dtype=np.float32, **TINY)


def _t5x_module() -> network.Transformer:
    return network.Transformer(
        network.T5Config(
            vocab_size=VOCAB_SIZE,
            dtype="float32",
            mlp_activations=("gelu", "linear"),
            dropout_rate=0.0,
            logits_via_embedding=False,
            **TINY,
        )
    )


def _orbax_target(step_dir: Path) -> dict:
    """The parameters of a t5x checkpoint as orbax alone restores them (none of our code)."""
    return ocp.PyTreeCheckpointer().restore(step_dir / "state")["target"]


def _flat(tree: dict) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


@pytest.fixture(scope="module")
def t5x_run(builtin_cache_root, tmp_path_factory):
    """A t5x finetune.gin run on our mixture from a converted checkpoint, then eval and infer."""
    root = tmp_path_factory.mktemp("t5x")
    tokens = np.ones((1, 4), np.int32)
    initial = T5(_our_config()).init(jax.random.key(0), tokens, tokens, enable_dropout=False)
    initial = jax.tree.map(np.asarray, nn.unbox(initial["params"]))
    t5x_checkpoints.write_t5x_checkpoint(initial, root / "converted")
    model_dir = root / "model"
    _t5x(
        "train",
        "finetune.gin",
        builtin_cache_root,
        "--gin_file=dsbs_t5x/step_by_step.gin",
        "--gin_file=dsbs_t5x/restore_without_optimizer_state.gin",
        f'--gin.MODEL_DIR="{model_dir}"',
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
        f"--gin.TRAIN_STEPS={TRAIN_STEPS}",
        f'--gin.INITIAL_CHECKPOINT_PATH="{root / "converted" / "checkpoint_0"}"',
        "--gin.BATCH_SIZE=8",
        f"--gin.EVAL_PERIOD={EVAL_PERIOD}",
        "--gin.EVAL_STEPS=2",
        f"--gin.utils.SaveCheckpointConfig.period={EVAL_PERIOD}",
        "--gin.utils.create_learning_rate_scheduler.base_learning_rate=0.05",
    )
    final = model_dir / f"checkpoint_{TRAIN_STEPS}"
    _t5x(
        "eval",
        "eval.gin",
        builtin_cache_root,
        "--gin_file=dsbs_t5x/tasks.gin",
        f'--gin.CHECKPOINT_PATH="{final}"',
        f'--gin.EVAL_OUTPUT_DIR="{root / "eval"}"',
    )
    _t5x(
        "infer",
        "infer.gin",
        builtin_cache_root,
        "--gin_file=dsbs_t5x/tasks.gin",
        f'--gin.CHECKPOINT_PATH="{final}"',
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
        f'--gin.INFER_OUTPUT_DIR="{root / "infer"}"',
    )
    return {"root": root, "initial": initial, "model_dir": model_dir, "final": final}


def _scalars(log_dir: Path, tag: str) -> dict[int, float]:
    values = {}
    for path in glob.glob(str(log_dir / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def test_t5x_restores_our_checkpoint_with_identical_parameters(t5x_run):
    """t5x writes its starting state as checkpoint_0: exactly the parameters we converted."""
    restored = _flat(_orbax_target(t5x_run["model_dir"] / "checkpoint_0"))
    want = _flat(t5x_run["initial"])
    assert restored.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(restored[name], want[name], err_msg=name)


def test_t5x_trains_our_mixture_and_the_loss_falls(t5x_run):
    """Training eval on the same validation batches, at step 3 and step 6."""
    log_dir = t5x_run["model_dir"] / "training_eval" / MIXTURE
    losses = _scalars(log_dir, "loss")
    assert sorted(losses) == [EVAL_PERIOD, TRAIN_STEPS]
    assert losses[TRAIN_STEPS] < losses[EVAL_PERIOD]
    label_loss = _scalars(t5x_run["model_dir"] / "train", "step_by_step/label_loss")
    assert label_loss and all(np.isfinite(v) for v in label_loss.values())
    tree = ocp.PyTreeCheckpointer().metadata(t5x_run["final"] / "state").item_metadata.tree
    assert "param_states" in tree["state"]


def test_t5x_infer_eval_eval_and_infer_read_our_tasks(t5x_run):
    """finetune.gin's infer_eval and t5x.eval score the label task; t5x.infer decodes test."""
    written = {}
    for out in (t5x_run["model_dir"], t5x_run["root"] / "eval"):
        metrics_file = out / "inference_eval" / f"{LABEL_TASK}-metrics.jsonl"
        records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        assert all(0.0 <= r["accuracy"] <= 100.0 for r in records)
        written[out.name] = [r["step"] for r in records]
    assert written == {"model": [EVAL_PERIOD, TRAIN_STEPS], "eval": [TRAIN_STEPS]}
    shards = t5x_run["root"] / "infer" / f"{LABEL_TASK}-predict.jsonl-?????-of-?????"
    (predictions,) = glob.glob(str(shards))
    lines = [json.loads(line) for line in Path(predictions).read_text().splitlines()]
    assert len(lines) == 24 and all("prediction" in line for line in lines)  # test.jsonl


def test_our_reader_matches_t5x_decoder_logits_exactly(t5x_run, gin_cache_root):
    """A t5x-trained checkpoint (optimizer state, step 6, MODEL_DIR = latest) read by ours."""
    config = checkpoint_import.checkpoint_config(str(t5x_run["model_dir"]), dtype=np.float32)
    assert config == _our_config()
    shardings = checkpoint_import.param_shardings(config, Partitioner())
    ours = checkpoint_import.load_params(str(t5x_run["model_dir"]), config, shardings)
    batch = _batch(alpha=0.5)
    args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    kwargs = {k: batch[k] for k in batch if k.endswith(("segment_ids", "positions"))}
    our_logits = T5(config).apply(
        {"params": ours}, *args, batch["decoder_target_tokens"], enable_dropout=False, **kwargs
    )
    t5x_logits = _t5x_module().apply(
        {"params": _orbax_target(t5x_run["final"])},
        *args,
        batch["decoder_target_tokens"],
        enable_dropout=False,
        **kwargs,
    )
    np.testing.assert_array_equal(np.asarray(our_logits), np.asarray(t5x_logits))


def _batch(alpha: float) -> dict[str, np.ndarray]:
    """One packed training batch of our mixture, as t5x's pipeline makes it with our model."""
    with gin.unlock_config():
        gin.bind_parameter("step_by_step_loss_weights.alpha", alpha)
    ds = seqio.get_dataset(MIXTURE, LENGTHS, StepByStepFeatureConverter(pack=True), shuffle=False)
    return next(ds.batch(8).as_numpy_iterator())


def test_t5x_trains_exactly_our_step_by_step_loss(gin_cache_root):
    """The t5x model's loss equals ours on the same batch, and is the per-task-mean loss."""
    alpha = 0.3
    batch = _batch(alpha)
    vocabulary = registration.task_vocabulary(MIXTURE)
    model = StepByStepEncoderDecoderModel(
        _t5x_module(), vocabulary, vocabulary, adafactor.Adafactor(), z_loss=1e-4
    )
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    params = model.get_initial_variables(jax.random.PRNGKey(1), shapes, types)["params"]
    loss, _ = model.loss_fn(params, batch, None)
    logits = model._compute_logits(params, batch, None)
    ours, _ = step_by_step_loss(logits, batch, z_loss=1e-4)
    np.testing.assert_allclose(float(loss), float(ours), rtol=1e-6)
    # The definition, with t5x's own token loss: alpha * label mean + (1 - alpha) * rationale mean.
    targets = batch["decoder_target_tokens"]
    token_loss, _ = t5x_losses.cross_entropy_with_logits(
        logits, jax.nn.one_hot(targets, VOCAB_SIZE), z_loss=1e-4
    )
    roles = batch["decoder_task_ids"]
    means = [float(np.asarray(token_loss)[roles == r].mean()) for r in (1, 2)]
    np.testing.assert_allclose(float(loss), alpha * means[0] + (1 - alpha) * means[1], rtol=1e-6)


PARSE_RUN_FILES = """
import os
import sys
import gin
import t5x.train
sys.modules["__main__"] = t5x.train  # finetune.gin configures `__main__.train`
from t5x import gin_utils
search_path, *run_files = sys.argv[1:]
t5x_root = os.path.dirname(os.path.dirname(t5x.train.__file__))
for run_file in run_files:
    gin_utils.parse_gin_flags(
        [t5x_root, search_path],
        ["t5x/examples/t5/t5_1_1/base.gin", "t5x/configs/runs/finetune.gin", run_file],
        [],
        finalize_config=False,
    )
    print(run_file, gin.query_parameter("%MIXTURE_OR_TASK_NAME"))
    gin.clear_config()
"""


def test_every_t5x_run_file_parses_after_t5x_finetune_gin():
    run_files = sorted(p.relative_to(REPO / "gin_configs").as_posix() for p in RUN_FILES)
    done = subprocess.run(
        [sys.executable, "-c", PARSE_RUN_FILES, str(REPO / "gin_configs"), *run_files],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = dict(line.split() for line in done.stdout.splitlines())
    assert parsed == {f: f"dsbs_{Path(f).stem.removesuffix('_asdiv')}" for f in run_files}


def test_model_vocabulary_is_the_run_datasets_own_as_t5x_checks_it(builtin_cache_root, tmp_path):
    """With VOCABULARY_PATH None, tasks.gin's VOCABULARY is the mixture's dataset's own
    vocabulary, and t5x's own check accepts it, after gin's copy, against the tasks."""
    import copy
    import dataclasses
    import shutil
    import types

    from t5x import utils as t5x_utils

    from dsbs_jax import t5x_models
    from dsbs_jax.data import cache, vocab

    name = "t5xvocab"
    shutil.copytree(builtin_cache_root / "synthetic", tmp_path / "synthetic")
    records = cache.read_records(tmp_path / "synthetic" / "train.jsonl")
    renamed = [dataclasses.replace(r, input=r.input.replace("pens", "crayons")) for r in records]
    cache.write_splits(tmp_path / name, {"train": renamed, "valid": renamed, "test": renamed})
    vocab.write_dataset_vocab(tmp_path / name)
    registration.register_dataset(name)
    ours = registration.mixture_name(name, "step_by_step")

    def check(model_vocabulary: seqio.Vocabulary) -> None:
        config = t5x_utils.DatasetConfig(ours, LENGTHS, "train", 8, shuffle=False, seed=None)
        model = types.SimpleNamespace(
            input_vocabulary=model_vocabulary, output_vocabulary=model_vocabulary
        )
        t5x_utils.verify_matching_vocabs(config, model)

    with gin.unlock_config():
        gin.bind_parameter("teacher_cache_root.path", str(tmp_path))
    try:
        vocabulary = copy.deepcopy(t5x_models.task_vocabulary(ours))
        assert vocabulary == seqio.SentencePieceVocabulary(str(tmp_path / name / "spm.model"))
        check(vocabulary)
        with pytest.raises(ValueError, match="vocabularies do not match"):
            check(t5x_models.task_vocabulary(MIXTURE))  # the built-in dataset's
    finally:
        gin.clear_config()
