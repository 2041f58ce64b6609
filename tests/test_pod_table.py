"""The pod table's search: cheapest settings first, stops at a fit, resumes, renders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dsbs_jax import pod_table
from dsbs_jax.aot import GiB
from dsbs_jax.pod_table import LADDER, Settings


def _fake_compiler(fits_from: int, arguments: int = GiB, hbm: int = 16 * GiB):
    """A try_settings that fits from LADDER[fits_from] on, and records what it compiled."""
    compiled = []

    def try_settings(gin_args, size, slice_name, optimizer, settings, timeout):
        compiled.append(settings)
        fits = LADDER.index(settings) >= fits_from
        total = (12 if fits else 20) * GiB
        return {
            "settings": dataclasses.asdict(settings),
            "outcome": "fits" if fits else "does not fit",
            "fits": fits,
            "total_bytes": total,
            "hbm_bytes": hbm,
            "argument_bytes": arguments,
        }

    return try_settings, compiled


def test_search_goes_up_the_ladder_to_the_first_fit(monkeypatch):
    fake, compiled = _fake_compiler(fits_from=3)
    monkeypatch.setattr(pod_table, "try_settings", fake)
    tries = list(pod_table.search_cell([], "xl", "v5litepod-16", "adamw", 60))
    assert compiled == list(LADDER[:4])
    assert [t["outcome"] for t in tries] == ["does not fit"] * 3 + ["fits"]
    assert pod_table.cell_summary(tries, 16) == "mp1 p2 full: 12.0 GiB (75%)"
    by_hand = tries[-1:]  # a fit compiled before the cheaper settings were
    assert pod_table.cell_summary(by_hand, 16) == (
        "mp1 p2 full: 12.0 GiB (75%; cheaper settings not tried yet)"
    )
    costly = {**tries[-1], "settings": dataclasses.asdict(LADDER[6]), "total_bytes": 8 * GiB}
    assert pod_table.cell_summary([costly, *tries], 16) == "mp1 p2 full: 12.0 GiB (75%)"


def test_search_skips_what_the_slice_cannot_hold_and_resumes(monkeypatch):
    fake, compiled = _fake_compiler(fits_from=len(LADDER) - 1)
    monkeypatch.setattr(pod_table, "try_settings", fake)
    # v4-8 has 4 chips: no 8 or 16 partitions; 64 rows split over the data axis.
    first = list(pod_table.search_cell([], "xxl", "v4-8", "adamw", 60))
    assert all(s.num_partitions <= 4 for s in compiled) and len(first) == 7
    assert pod_table.cell_summary(first, 4) == "no: at least 20.0 GiB (mp1 p1 none)"
    compiled.clear()  # a resumed run repeats nothing; a smaller model's misfits are skipped
    done, too_big = first[:2], [first[2]["settings"]]
    again = list(pod_table.search_cell([], "xxl", "v4-8", "adamw", 60, done, too_big))
    assert compiled == list(LADDER[3:7])
    assert [t["outcome"] for t in again] == [pod_table.SKIPPED] + ["does not fit"] * 4
    assert pod_table.applicable(Settings(8, 2, "full"), 64) and not pod_table.applicable(
        Settings(1, 1, "none"), 128
    )  # 64 rows on 128 data-parallel chips


def test_search_stops_when_the_split_state_alone_leaves_no_room(monkeypatch):
    fake, compiled = _fake_compiler(fits_from=len(LADDER), arguments=40 * GiB, hbm=32 * GiB)
    monkeypatch.setattr(pod_table, "try_settings", fake)
    tries = list(pod_table.search_cell([], "xxl", "v4-8", "adamw", 60))
    assert compiled == list(LADDER[:2])  # the first 2-D try shows the state cannot fit
    assert pod_table.cell_summary(tries, 4) == "no: state alone 40.0 GiB a chip"


def test_table_renders_from_the_results_and_bad_names_exit_2(tmp_path, capsys):
    fits = {
        "settings": dataclasses.asdict(Settings(4, 2, "full", 2)),
        "outcome": "fits",
        "fits": True,
        "total_bytes": 25 * GiB,
        "hbm_bytes": 32 * GiB,
    }
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"xxl/v4-32/adamw": [fits]}))
    markdown = tmp_path / "table.md"
    argv = ["--results", str(results), "--markdown", str(markdown), "--render-only"]
    assert pod_table.main([*argv, "--sizes=xl,xxl", "--slices=v4-32,v5p-8"]) == 0
    table = markdown.read_text()
    assert "| v4-32 (16 chips, 32 GiB) | v5p-8 (4 chips, 95 GiB) |" in table
    assert "| xxl | mp4 p2 a2 full: 25.0 GiB (78%; cheaper settings not tried yet) |" in table
    assert "| xl | not compiled yet | not compiled yet |" in table
    with pytest.raises(SystemExit) as exit_info:
        pod_table.main([*argv, "--slices=v9-8"])
    assert exit_info.value.code == 2
    assert "--slices: unknown ['v9-8']" in capsys.readouterr().err


def test_pod_files_set_the_settings_found_after_a_run_file(tmp_path):
    import gin

    from dsbs_jax.gin_utils import parse_gin

    found = {
        "settings": dataclasses.asdict(Settings(8, 2, "minimal")),  # not on the ladder
        "outcome": "fits",
        "fits": True,
        "total_bytes": 11 * GiB,
        "hbm_bytes": 16 * GiB,
    }
    misfit = {**found, "outcome": "does not fit", "fits": False, "total_bytes": 20 * GiB}
    results = {"xxl/v5litepod-64/adamw": [found], "xxl/v5litepod-64/adafactor": [misfit]}
    written = pod_table.write_pod_files(results, tmp_path)
    assert [p.name for p in written] == ["v5e_64_xxl.gin"]
    assert (
        "Adafactor" in written[0].read_text() and "no: at least 20.0 GiB" in written[0].read_text()
    )
    try:
        parse_gin(["runs/cqa_step_by_step.gin", str(written[0])], [], [])
        assert gin.query_parameter("t5_config.preset") == "xxl"
        assert gin.query_parameter("initialize_distributed.auto_detect") is True  # the slice's
        assert gin.query_parameter("Partitioner.num_partitions") == 8
        assert gin.query_parameter("Partitioner.parameter_partitioning_dims") == 2
        assert gin.query_parameter("t5_config.remat_policy") == "minimal"
        assert gin.query_parameter("t5_config.scan_layers") is True
    finally:
        gin.clear_config()


def test_committed_pod_files_set_the_cheapest_fit_of_the_committed_table():
    """Every pods/<slice>_<size>.gin sets what docs/pod_table.json says fits."""
    import gin

    from dsbs_jax.gin_utils import parse_gin

    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "docs" / "pod_table.json").read_text())
    checked = 0
    for size in pod_table.SIZES:
        for slice_name in pod_table.SLICES:
            name = f"{pod_table.pod_file_stem(slice_name)}_{size}.gin"
            fit = pod_table.fitting_try(
                results.get(pod_table.cell_key(size, slice_name, "adamw"), [])
            )
            pod_file = root / "dsbs_jax" / "gin_configs" / "pods" / name
            assert pod_file.is_file() == (fit is not None), name
            if fit is None:
                continue
            try:
                parse_gin(["runs/cqa_step_by_step.gin", f"pods/{name}"], [], [])
                settings = fit["settings"]
                assert gin.query_parameter("t5_config.preset") == size
                assert gin.query_parameter("BATCH_SIZE/macro.value") == pod_table.BATCH_SIZE
                assert gin.query_parameter("make_optimizer.name") == "adamw"
                for gin_name, key in (
                    ("Partitioner.num_partitions", "num_partitions"),
                    ("Partitioner.parameter_partitioning_dims", "parameter_partitioning_dims"),
                    ("Partitioner.activation_partitioning_dims", "activation_partitioning_dims"),
                    ("t5_config.remat_policy", "remat_policy"),
                ):
                    assert gin.query_parameter(gin_name) == settings[key], (name, gin_name)
                assert gin.query_parameter("t5_config.scan_layers") is True
                assert gin.query_parameter("t5_config.float32_attention_logits") is False
            finally:
                gin.clear_config()
            checked += 1
    assert checked >= 20  # small to xl fit every slice with AdamW
