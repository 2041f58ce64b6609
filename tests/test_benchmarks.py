"""The benchmark scripts run end to end on tiny settings and report every figure."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gin
import numpy as np
import pytest

from benchmarks import (
    batch_file,
    decode_throughput,
    eval_throughput,
    matmul,
    packing,
    peaks,
    resume,
    train_throughput,
)


@pytest.fixture
def common_args(builtin_cache_root: Path):
    # Both sides in this process, on the built-in data and a tiny model.
    yield [
        "--dataset=synthetic",
        f"--data-dir={builtin_cache_root}",
        "--preset=tiny",
        "--model-vocab-size=128",
        "--in-process",
    ]
    gin.clear_config()


def _positive(result: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert result[key] > 0, (key, result)


# Runs the training benchmark in a fresh interpreter in which TensorFlow and SeqIO look
# uninstalled, as on an accelerator host (see tests/test_core_without_tensorflow.py).
WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import sys

    BLOCKED = ("tensorflow", "tensorflow_text", "tensorflow_datasets", "seqio")
    for name in BLOCKED:
        sys.modules[name] = None

    from benchmarks import train_throughput

    train_throughput.main(sys.argv[1:])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m])
    assert not loaded, loaded
    print("benchmark ran without TensorFlow")
    """
)


def _run_without_tensorflow(argv: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, *argv],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).parents[1],
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "benchmark ran without TensorFlow" in result.stdout


@pytest.mark.slow
def test_train_throughput_runs_written_batches_without_tensorflow(
    common_args, tmp_path: Path, capsys
):
    """A run building its own batches reports every figure, and where its step's time goes.
    Batches written here (SeqIO) and read by a run that cannot import TensorFlow give that
    run the same figures, of the same data."""
    model = ["--dataset=synthetic", "--preset=tiny", "--model-vocab-size=128"]
    tiny = [
        "--steps=2",
        "--warmup=0",
        "--batch-size=4",
        "--rows=8",
        "--inputs-length=64",
        "--targets-length=64",
        "--count-flops",
    ]
    stored = tmp_path / "batches.npz"
    train_throughput.main([*common_args, *tiny, f"--write-batches={stored}"])
    assert stored.is_file() and f"wrote {stored}" in capsys.readouterr().out
    direct = tmp_path / "direct.json"
    train_throughput.main(
        [*common_args, *tiny, f"--profile={tmp_path / 'trace'}", f"--json={direct}"]
    )
    payload = json.loads(direct.read_text())
    # The profile splits the traced step's op time by kind; the model's dots are traced.
    shares = payload["results"]["ours"]["op_time_shares"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["matrix multiplies"] > 0
    top = payload["results"]["ours"]["top_ops"]  # the longest ops, each with its HLO line
    assert top and all(" = " in op["op"] and op["seconds"] > 0 for op in top)
    reported = ("examples_per_s", "tokens_per_s", "step_time_median_s", "peak_rss_mib", "gflops")
    for side in ("ours", "baseline"):
        _positive(payload["results"][side], (*reported, "matrix_gflops", "real_token_fraction"))
    ours = payload["results"]["ours"]  # XLA's count adds elementwise work to the dots
    assert ours["matrix_gflop_per_step"] < ours["gflop_per_step"]
    _positive(payload["results"]["ours"], ("compile_s",))
    _positive(payload["ratios"], ("examples_per_s", "tokens_per_s"))
    assert payload["results"]["baseline"]["examples_per_step"] == 4
    # On the CPU: each side says so, and no chip's peak is known.
    for side in ("ours", "baseline"):
        result = payload["results"][side]
        assert (result["device"], result["platform"]) == ("cpu", "cpu")
        assert not {"peak_tflops", "peak_fraction"} & result.keys()
    from_file = tmp_path / "from_file.json"
    # No --data-dir: the file is all the run needs.
    _run_without_tensorflow(
        [*model, *tiny, "--in-process", f"--batches={stored}", f"--json={from_file}"]
    )

    expected, results = payload["results"], json.loads(from_file.read_text())["results"]
    same_data = ("examples_per_step", "real_token_fraction", "timed_steps", "dataset")
    for side in ("ours", "baseline"):
        figures = {key for key, _, _ in train_throughput.FIGURES}
        assert figures & results[side].keys() == figures & expected[side].keys(), side
        _positive(results[side], ("examples_per_s", "tokens_per_s", "step_time_median_s"))
        for key in same_data:
            assert results[side][key] == expected[side][key], (side, key)
        # Same batches, weights and dropout seeds: the same loss.
        assert results[side]["last_loss"] == pytest.approx(expected[side]["last_loss"], rel=1e-5)
    assert results["ours"]["rows"] == expected["ours"]["rows"]
    assert results["baseline"]["mean_padded_lengths"] == expected["baseline"]["mean_padded_lengths"]

    # A file written with other settings, or none at all: one line and status 2, no side run.
    for argv, message in (
        ([*model, "--steps=3", "--warmup=0", f"--batches={stored}"], "--steps 2"),
        ([*model, f"--batches={tmp_path / 'absent.npz'}"], "not found"),
    ):
        with pytest.raises(SystemExit) as exited:
            train_throughput.main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def _jax_sees_a_gpu() -> bool:
    """Whether JAX, left to choose its platform (the tests pin it to the CPU), finds a GPU."""
    if importlib.util.find_spec("jax_plugins") is None:  # no CUDA plugin: no GPU for JAX
        return False
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return probe.stdout.strip().endswith("gpu")


def _write_made_up_batches(path: Path, argv: list[str]) -> None:
    """Random token ids in the batch file's layout, made without SeqIO (a GPU host has none):
    ours unpacked (`--no-pack`), a label row and a rationale row per pair."""
    args = train_throughput.build_parser().parse_args(argv)
    rng = np.random.default_rng(0)
    rows = 2 * args.batch_size

    def ids(*shape: int) -> np.ndarray:
        return rng.integers(2, args.model_vocab_size, shape).astype(np.int32)

    ours, baseline = [], []
    for _ in range(1 + args.warmup + args.steps):
        targets = ids(rows, args.targets_length)
        ours.append(
            {
                "encoder_input_tokens": ids(rows, args.inputs_length),
                "decoder_target_tokens": targets,
                "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
                "decoder_loss_weights": np.full(targets.shape, 0.5, np.float32),
                "decoder_task_ids": np.repeat(
                    np.tile([[1], [2]], (args.batch_size, 1)), args.targets_length, axis=1
                ).astype(np.int32),
            }
        )
        baseline.append(
            [
                ({"inputs": ids(40), "targets": ids(3)}, {"inputs": ids(44), "targets": ids(60)})
                for _ in range(args.batch_size)
            ]
        )
    batch_file.write(path, train_throughput.batch_meta(args, "synthetic", rows), ours, baseline)


@pytest.mark.skipif(not _jax_sees_a_gpu(), reason="no GPU visible to JAX")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_throughput_runs_both_sides_on_the_gpu(tmp_path: Path, dtype: str):
    import torch

    argv = [
        "--dataset=synthetic",
        "--preset=tiny",
        "--model-vocab-size=128",
        "--steps=2",
        "--warmup=1",
        "--batch-size=4",
        "--inputs-length=64",
        "--targets-length=64",
        "--no-pack",
        f"--dtype={dtype}",
        f"--baseline-dtype={dtype}",
    ]
    stored, out = tmp_path / "batches.npz", tmp_path / "train.json"
    _write_made_up_batches(stored, argv)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    _run_without_tensorflow(
        [*argv, "--count-flops", "--in-process", f"--batches={stored}", f"--json={out}"], env
    )
    results = json.loads(out.read_text())["results"]
    assert results["ours"]["platform"] == "gpu" and results["ours"]["device"] != "cpu"
    assert results["baseline"]["platform"] == ("cuda" if torch.cuda.is_available() else "cpu")
    precisions = {"ours": "tf32", "baseline": "float32"} if dtype == "float32" else {}
    for side, result in results.items():
        _positive(result, ("examples_per_s", "gflops", "matrix_gflops"))
        precision = precisions.get(side, "bfloat16")
        if peaks.peak_tflops(result["device"], precision) is not None:
            assert result["peak_precision"] == precision
            assert 0 < result["peak_fraction"] < 1, result


@pytest.mark.parametrize(
    ("name", "bfloat16", "float32"),
    [
        ("NVIDIA H200", 989.5, 67.0),
        ("NVIDIA H200 NVL", 835.5, 60.0),
        ("NVIDIA GH200 480GB", 989.5, 67.0),
        ("NVIDIA H100 80GB HBM3", 989.5, 67.0),
        ("NVIDIA H100 PCIe", 756.5, 51.0),
        ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),
        ("NVIDIA A100 80GB PCIe", 312.0, 19.5),
        ("NVIDIA L40S", 366.5, 91.6),
        ("NVIDIA L4", 121.0, 30.3),
        ("NVIDIA A10G", None, None),  # AWS's part, not the A10's figures
        ("cpu", None, None),
    ],
)
def test_peak_tflops_matches_the_device_name(name: str, bfloat16, float32):
    assert peaks.peak_tflops(name, "bfloat16") == bfloat16
    assert peaks.peak_tflops(name, "float32") == float32


def test_decode_throughput(common_args, tmp_path: Path):
    out = tmp_path / "decode.json"
    decode_throughput.main(
        [
            *common_args,
            "--steps=2",
            "--warmup=1",
            "--batch-size=8",
            "--max-decode-length=4",
            "--pad-multiple=128",  # one input length, one compilation
            f"--json={out}",
        ]
    )
    payload = json.loads(out.read_text())
    for side in ("ours", "baseline"):
        _positive(
            payload["results"][side], ("examples_per_s", "tokens_per_s", "batch_time_median_s")
        )
    _positive(payload["results"]["ours"], ("compile_s",))
    _positive(payload["ratios"], ("examples_per_s",))


@pytest.mark.slow
def test_eval_throughput(choices_cache_root: Path, tmp_path: Path):
    """A briefly trained tiny student, evaluated by both sides on the whole (24-input) test
    split: ours in generate and score modes, the baseline from its Hugging Face export."""
    out = tmp_path / "eval.json"
    eval_throughput.main(
        [
            "--dataset=synthetic",
            f"--data-dir={choices_cache_root}",
            "--preset=tiny",
            "--model-vocab-size=128",
            "--in-process",
            "--train-steps=3",
            "--train-batch-size=8",
            "--batch-size=16",
            "--score-batch-size=8",
            "--official-batch-size=8",
            "--gen-max-len=8",
            "--inputs-length=64",
            f"--json={out}",
        ]
    )
    gin.clear_config()
    payload = json.loads(out.read_text())
    ours, baseline = payload["results"]["ours"], payload["results"]["baseline"]
    assert ours["examples"] == baseline["examples"] == 24
    _positive(payload["ratios"], ("examples_per_s_generate", "examples_per_s_score"))
    # Same weights, greedy on both sides: the same labels, so the same accuracy.
    assert ours["accuracy_generate"] == baseline["accuracy_generate"]
    assert 0.0 <= ours["accuracy_score"] <= 100.0


def test_packing_raises_the_real_token_fraction(common_args, tmp_path: Path):
    out = tmp_path / "packing.json"
    packing.main(
        [
            *common_args,
            "--steps=3",
            "--batch-size=4",
            "--inputs-length=128",
            "--targets-length=128",
            f"--json={out}",
        ]
    )
    results = json.loads(out.read_text())["results"]
    for side in ("ours", "ours_unpacked", "baseline"):
        for key in ("real_fraction", "real_fraction_inputs", "real_fraction_targets"):
            assert 0 < results[side][key] <= 1, (side, key)
    assert results["ours"]["real_fraction"] > results["ours_unpacked"]["real_fraction"]


def test_resume_gets_the_uninterrupted_batches_from_the_saved_state(common_args, tmp_path: Path):
    out = tmp_path / "resume.json"
    resume.main(
        [
            *common_args,
            "--batch-size=4",
            "--inputs-length=64",
            "--targets-length=64",
            "--resume-steps=3,17",
            "--replay-steps=5",
            "--compare=2",
            f"--json={out}",
        ]
    )
    payload = json.loads(out.read_text())
    assert payload["batches_equal"] is True
    assert payload["restored"] is True  # from the saved state, not by running the batches
    assert payload["fresh_first_batch_s"] > 0
    assert payload["resume_first_batch_s"].keys() == {"3", "17"}
    assert payload["replay_first_batch_s"].keys() == {"5"}
    assert all(save["state_bytes"] > 0 for save in payload["saves"].values())
    assert payload["machine"]["cpu_count"] > 0 and "cpu_model" in payload["machine"]


def test_matmul_reports_every_precision_and_whether_xla_converted(tmp_path: Path):
    out = tmp_path / "matmul.json"
    argv = ["--in-process", "--steps=2", "--warmup=0", "--m=8", "--k=16", "--n=32"]
    matmul.main([*argv, f"--json={out}"])
    results = json.loads(out.read_text())["results"]
    for side in ("ours", "baseline"):
        _positive(results[side], tuple(f"gflops_{name}" for name in matmul.PRECISIONS))
    # A float32 result keeps XLA on the bfloat16 operands; a bfloat16 one makes it convert.
    assert results["ours"]["converts_operands_bfloat16"] is True
    assert results["ours"]["converts_operands_bfloat16_f32"] is False


def test_converts_operands_looks_for_a_float32_copy_of_the_operand():
    hlo = (
        "%a = bf16[8,16]{1,0} parameter(0)\n%b = bf16[16,32]{1,0} parameter(1)\n"
        "%c = f32[8,16]{1,0} fusion(%a), kind=kLoop\n%d = f32[16,32]{1,0} fusion(%b)\n"
        "ROOT %e = f32[8,32]{1,0} dot(%c, %d), lhs_contracting_dims={1}"
    )
    assert matmul.dot_operand_types(hlo) == [("f32", "f32")]
    assert matmul.converts_operands(hlo)
    assert not matmul.converts_operands(hlo.replace("dot(%c, %d)", "dot(%a, %b)"))


def test_dot_gflop_counts_cublas_calls_as_their_dots():
    """XLA:GPU turns dots into cuBLAS custom calls; their backend config keeps the dot's
    dimension numbers, and a result may be a tuple with the call's workspace."""
    hlo = (
        "%p0 = f32[100,256]{1,0} parameter(0)\n%p1 = f32[256,64]{1,0} parameter(1)\n"
        "%bias = f32[100,64]{1,0} parameter(2)\n"
        "%gemm.1 = (f32[100,64]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1, %bias), "
        'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":'
        '{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
        '"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],'
        '"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}\n'
        "%a = bf16[4,8,16]{2,1,0} parameter(3)\n%b = bf16[4,16,5]{2,1,0} parameter(4)\n"
        "ROOT %gemm.2 = bf16[4,8,5]{2,1,0} custom-call(%a, %b), "
        'custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":'
        '{"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],'
        '"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],'
        '"rhs_batch_dimensions":["0"]}}}'
    )
    assert matmul.dot_gflop(hlo) * 1e9 == 2 * 100 * 64 * 256 + 2 * 4 * 8 * 5 * 16
    assert matmul.dot_operand_types(hlo) == [("f32", "f32"), ("bf16", "bf16")]


def test_dot_gflop_counts_each_dot_by_its_result_and_contracted_size():
    import jax
    import jax.numpy as jnp

    def attend(x, w, keys):  # [4, 8, 16] @ [16, 16], then a batched dot with [4, 5, 16]
        return jnp.einsum("bqd,bkd->bqk", x @ w, keys)

    args = (jnp.ones((4, 8, 16)), jnp.ones((16, 16)), jnp.ones((4, 5, 16)))
    hlo = jax.jit(attend).lower(*args).compile().as_text()
    assert matmul.dot_gflop(hlo) * 1e9 == pytest.approx(2 * 32 * 16 * 16 + 2 * 4 * 8 * 5 * 16)
