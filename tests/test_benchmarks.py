"""The benchmark scripts run end to end on tiny settings and report every figure."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest

from benchmarks import decode_throughput, matmul, packing, train_throughput


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
            f"--json={out}",
        ]
    )
    payload = json.loads(out.read_text())
    figures = ("examples_per_s", "tokens_per_s", "step_time_median_s", "peak_rss_mib")
    for side in ("ours", "baseline"):
        _positive(payload["results"][side], (*figures, "real_token_fraction"))
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


def test_matmul_reports_both_dtypes_and_what_xla_compiled(tmp_path: Path):
    out = tmp_path / "matmul.json"
    matmul.main(
        ["--in-process", "--steps=2", "--warmup=0", "--m=8", "--k=16", "--n=32", f"--json={out}"]
    )
    payload = json.loads(out.read_text())
    for side in ("ours", "baseline"):
        _positive(payload["results"][side], ("gflops_float32", "gflops_bfloat16"))
    assert payload["results"]["ours"]["xla_dot_dtype_float32"] == "f32"
    assert payload["results"]["ours"]["xla_dot_dtype_bfloat16"] in {"f32", "bf16"}


def test_compiled_dot_dtype_reads_library_fusions_and_plain_dots():
    fusion = "  %ynn_fusion = f32[8,32]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused"
    assert matmul.compiled_dot_dtype("%x = bf16[8,16]{1,0} parameter(0)\n" + fusion) == "f32"
    assert matmul.compiled_dot_dtype("ROOT %d = bf16[8,32]{1,0} dot(%a, %b), lhs=") == "bf16"
    with pytest.raises(ValueError, match="no dot"):
        matmul.compiled_dot_dtype("%x = f32[8]{0} add(%a, %b)")
