"""Our tasks, loss and checkpoints inside a real t5x install, with t5x's own gin files.

t5x is not on PyPI; install it from its sources next to our pins (docs/t5x.md) and run
these with that environment's pytest. Without t5x they skip. One tiny t5x run (t5x's
tiny.gin, vocabulary and lengths shrunk by gin overrides) is shared by the tests: it
starts from a checkpoint `convert --format t5x` wrote, then t5x.eval and t5x.infer (greedy,
dsbs_t5x/greedy_decoding.gin) read what it trained. The demo's run file trains from scratch
in a run of its own.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

pytest.importorskip("t5x.train", reason="t5x is not installed (not on PyPI; see docs/t5x.md)")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
from flax import traverse_util  # noqa: E402
from t5x import adafactor, models, partitioning, utils  # noqa: E402
from t5x import losses as t5x_losses  # noqa: E402
from t5x import train_state as train_state_lib  # noqa: E402
from t5x.examples.t5 import network  # noqa: E402

from dsbs_jax import (  # noqa: E402
    checkpoint_import,
    convert,
    evaluation,
    label_prediction,
    t5x_checkpoints,
    trainer,
)
from dsbs_jax.checkpoints import Checkpointer  # noqa: E402
from dsbs_jax.data import registration  # noqa: E402
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter  # noqa: E402
from dsbs_jax.losses import step_by_step_loss  # noqa: E402
from dsbs_jax.models.t5 import T5, T5Config  # noqa: E402
from dsbs_jax.partitioning import Partitioner  # noqa: E402
from dsbs_jax.t5x_checkpoints import NETWORK_FIELDS  # noqa: E402
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
# t5x's CPU mesh puts every device on 'model' (8 under conftest.py), so a network restored in
# this process needs its vocabulary, heads and MLP divisible by 8: not tiny.gin's.
SHARDABLE = dict(
    emb_dim=16, num_heads=8, num_encoder_layers=2, num_decoder_layers=2, head_dim=4, mlp_dim=32
)
TRAIN_STEPS, EVAL_PERIOD = 6, 3
RUN_FILES = sorted((REPO / "dsbs_jax" / "gin_configs" / "dsbs_t5x" / "runs").glob("*.gin"))
# Run files that train from random initialisation: after pretrain.gin, not finetune.gin.
FROM_SCRATCH = {"dsbs_t5x/runs/demo.gin": "dsbs_synthetic_step_by_step"}


def _t5x(
    program: str, run_gin: str, cache_root: Path, *bindings: str, model_gin: str = "tiny.gin"
) -> None:
    """Runs `python -m t5x.<program>` with t5x's `model_gin`, `run_gin` and ours."""
    command = [
        sys.executable,
        "-m",
        f"t5x.{program}",
        f"--gin_search_paths={REPO / 'dsbs_jax' / 'gin_configs'}",
        f"--gin_file=t5x/examples/t5/t5_1_1/{model_gin}",
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


def _initial_params(config: T5Config, seed: int = 0) -> dict:
    tokens = np.ones((1, 4), np.int32)
    initial = T5(config).init(jax.random.key(seed), tokens, tokens, enable_dropout=False)
    return jax.tree.map(np.asarray, nn.unbox(initial["params"]))


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
    initial = _initial_params(_our_config())
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
        "--gin_file=dsbs_t5x/greedy_decoding.gin",
        # infer.gin restores in bfloat16; ours decodes the float32 parameters.
        "--gin.utils.RestoreCheckpointConfig.dtype='float32'",
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


def test_t5x_greedy_decoding_predicts_what_ours_predicts(t5x_run, gin_cache_root):
    """t5x.infer with dsbs_t5x/greedy_decoding.gin and ours, on the same test inputs."""
    shards = t5x_run["root"] / "infer" / f"{LABEL_TASK}-predict.jsonl-?????-of-?????"
    (predictions,) = glob.glob(str(shards))
    t5x_predictions = [json.loads(line)["prediction"] for line in Path(predictions).open()]
    config = checkpoint_import.checkpoint_config(str(t5x_run["final"]), dtype=np.float32)
    shardings = checkpoint_import.param_shardings(config, Partitioner())
    params = checkpoint_import.load_params(str(t5x_run["final"]), config, shardings)
    task = seqio.get_mixture_or_task(LABEL_TASK)
    examples = evaluation.read_split(task, "test", LENGTHS["inputs"], LENGTHS["targets"])
    ours = label_prediction.decode_batches(
        T5(config),
        params,
        Partitioner(),
        task.output_features["targets"].vocabulary,
        [ex["inputs"] for ex in examples],
        LENGTHS["inputs"],
        batch_size=8,
        max_decode_length=LENGTHS["targets"],
    )
    assert t5x_predictions == ours


def _t5x_restore(step_dir: Path, module: network.Transformer) -> train_state_lib.TrainState:
    """A checkpoint restored as t5x.eval restores it: parameters and step, no optimizer."""
    vocabulary = registration.vocabulary("synthetic")
    model = models.EncoderDecoderModel(module, vocabulary, vocabulary, adafactor.Adafactor())
    partitioner = partitioning.PjitPartitioner(num_partitions=1)
    initializer = utils.TrainStateInitializer(
        optimizer_def=None,
        init_fn=model.get_initial_variables,
        input_shapes={"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)},
        partitioner=partitioner,
    )
    restore = utils.RestoreCheckpointConfig(
        path=str(step_dir), mode="specific", dtype="float32", strict=False
    )
    state, _ = utils.create_checkpoint_manager_and_restore(
        initializer, partitioner, restore, str(step_dir), None, use_orbax=True
    )
    return state


def _printed_network(printed: str) -> network.Transformer:
    """t5x's network as gin configures it from the block `convert --format t5x` printed."""
    block = printed[printed.index("network.T5Config:") :]
    with gin.unlock_config():
        gin.parse_config(
            ["from __gin__ import dynamic_registration", "from t5x.examples.t5 import network"]
            + [block]
        )
    try:
        fields = {f: gin.query_parameter(f"network.T5Config.{f}") for f in NETWORK_FIELDS}
    finally:
        gin.clear_config()
    return network.Transformer(network.T5Config(dtype="float32", dropout_rate=0.0, **fields))


def test_t5x_restores_the_step_and_network_convert_gives(tmp_path, capsys):
    """Our run at step 20, converted: t5x's own restore reads step 20, every parameter, into
    the network that convert printed."""
    params = _initial_params(T5Config(vocab_size=VOCAB_SIZE, dtype=np.float32, **SHARDABLE))
    state = trainer.init_state(params, optax.adamw(1e-3)).replace(step=np.int32(20))
    with Checkpointer(tmp_path / "run") as checkpointer:
        checkpointer.save(20, state, data={}, force=True)
    argv = ["--from", str(tmp_path / "run"), "--to", str(tmp_path / "t5x"), "--format", "t5x"]
    assert convert.main(argv) == 0
    module = _printed_network(capsys.readouterr().out)
    restored = _t5x_restore(tmp_path / "t5x" / "checkpoint_20", module)
    assert int(restored.step) == 20
    got, want = _flat(restored.params), _flat(params)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


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


@pytest.mark.slow
def test_demo_run_file_trains_from_scratch_under_t5x(builtin_cache_root, tmp_path):
    """dsbs_t5x/runs/demo.gin after base.gin and pretrain.gin: the demo's network from random
    initialisation on our loss; only the vocabulary (the test cache's) and steps are shrunk."""
    model_dir = tmp_path / "demo"
    steps, period = 4, 2
    _t5x(
        "train",
        "pretrain.gin",
        builtin_cache_root,
        "--gin_file=dsbs_t5x/runs/demo.gin",
        f'--gin.MODEL_DIR="{model_dir}"',
        f"--gin.TRAIN_STEPS={steps}",
        f"--gin.EVAL_PERIOD={period}",
        "--gin.EVAL_STEPS=1",
        "--gin.BATCH_SIZE=8",
        model_gin="base.gin",
    )
    assert sorted(p.name for p in model_dir.glob("checkpoint_*")) == [
        f"checkpoint_{s}" for s in (0, period, steps)
    ]
    demo = dict(emb_dim=128, num_heads=4, head_dim=32, mlp_dim=256)
    config = checkpoint_import.checkpoint_config(str(model_dir), dtype=np.float32)
    assert config == T5Config(
        vocab_size=VOCAB_SIZE, num_encoder_layers=3, num_decoder_layers=3, dtype=np.float32, **demo
    )
    losses = _scalars(model_dir / "training_eval" / MIXTURE, "loss")
    assert sorted(losses) == [period, steps] and losses[steps] < losses[period]
    assert _scalars(model_dir / "train", "step_by_step/label_loss")
    metrics_file = model_dir / "inference_eval" / f"{LABEL_TASK}-metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [period, steps]


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
search_path, *runs = sys.argv[1:]
t5x_root = os.path.dirname(os.path.dirname(t5x.train.__file__))
for run in runs:
    run_gin, run_file = run.split(":")
    gin_utils.parse_gin_flags(
        [t5x_root, search_path],
        ["t5x/examples/t5/t5_1_1/base.gin", f"t5x/configs/runs/{run_gin}", run_file],
        [],
        finalize_config=False,
    )
    print(run_file, gin.query_parameter("%MIXTURE_OR_TASK_NAME"))
    gin.clear_config()
"""


def test_every_t5x_run_file_parses_after_t5x_finetune_or_pretrain_gin():
    configs = REPO / "dsbs_jax" / "gin_configs"
    run_files = sorted(p.relative_to(configs).as_posix() for p in RUN_FILES)
    runs = [f"{'pretrain' if f in FROM_SCRATCH else 'finetune'}.gin:{f}" for f in run_files]
    done = subprocess.run(
        [sys.executable, "-c", PARSE_RUN_FILES, str(REPO / "dsbs_jax" / "gin_configs"), *runs],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = dict(line.split() for line in done.stdout.splitlines())
    assert FROM_SCRATCH.keys() <= set(run_files)
    finetuned = {f: f"dsbs_{Path(f).stem.removesuffix('_asdiv')}" for f in run_files}
    assert parsed == {**finetuned, **FROM_SCRATCH}


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
