"""The benchmark scripts run end to end on tiny settings and report every figure."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest

from benchmarks import decode_throughput, eval_throughput, matmul, packing, resume, train_throughput


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


@pytest.mark.slow
def test_train_throughput(common_args, tmp_path: Path):
    out = tmp_path / "train.json"
    train_throughput.main(
        [
            *common_args,
            "--steps=2",
            "--warmup=0",
            "--batch-size=4",
            "--rows=8",  # divisible by the test session's 8 host devices
            "--inputs-length=64",
            "--targets-length=64",
            "--count-flops",
            f"--profile={tmp_path / 'trace'}",
            f"--json={out}",
        ]
    )
    payload = json.loads(out.read_text())
    # The profile splits the traced step's op time by kind; the model's dots are traced.
    shares = payload["results"]["ours"]["op_time_shares"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["matrix multiplies"] > 0
    top = payload["results"]["ours"]["top_ops"]  # the longest ops, each with its HLO line
    assert top and all(" = " in op["op"] and op["seconds"] > 0 for op in top)
    figures = ("examples_per_s", "tokens_per_s", "step_time_median_s", "peak_rss_mib", "gflops")
    for side in ("ours", "baseline"):
        _positive(payload["results"][side], (*figures, "matrix_gflops", "real_token_fraction"))
    ours = payload["results"]["ours"]  # XLA's count adds elementwise work to the dots
    assert ours["matrix_gflop_per_step"] < ours["gflop_per_step"]
    _positive(payload["results"]["ours"], ("compile_s",))
    _positive(payload["ratios"], ("examples_per_s", "tokens_per_s"))
    assert payload["results"]["baseline"]["examples_per_step"] == 4


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


def test_dot_gflop_counts_each_dot_by_its_result_and_contracted_size():
    import jax
    import jax.numpy as jnp

    def attend(x, w, keys):  # [4, 8, 16] @ [16, 16], then a batched dot with [4, 5, 16]
        return jnp.einsum("bqd,bkd->bqk", x @ w, keys)

    args = (jnp.ones((4, 8, 16)), jnp.ones((16, 16)), jnp.ones((4, 5, 16)))
    hlo = jax.jit(attend).lower(*args).compile().as_text()
    assert matmul.dot_gflop(hlo) * 1e9 == pytest.approx(2 * 32 * 16 * 16 + 2 * 4 * 8 * 5 * 16)
