"""Sweeps: planning, launching real tiny runs, skipping finished ones, aggregating and plotting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsbs_jax import results, sweep


def test_sweep_flags_parse_to_macros_and_values():
    assert sweep.parse_sweep_flag("ALPHA=[0.3, 0.5]") == ("ALPHA", [0.3, 0.5])
    assert sweep.parse_sweep_flag("VOCABULARY_PATH=['a', None]") == ("VOCABULARY_PATH", ["a", None])
    for bad in ("alpha=[0.3]", "ALPHA", "ALPHA=0.3", "ALPHA=[]", "ALPHA=[0.3,0.3]", "ALPHA=[x]"):
        with pytest.raises(ValueError, match="--sweep"):
            sweep.parse_sweep_flag(bad)


def test_alpha_free_methods_run_once_per_other_setting():
    runs = sweep.plan(
        ["dsbs", "finetune"], {"ALPHA": [0.3, 0.7], "TRAIN_FRACTION": [0.5, 1.0], "SEED": [0]}
    )
    names = [run.name for run in runs]
    assert names == [
        "dsbs,ALPHA=0.3,TRAIN_FRACTION=0.5,SEED=0",
        "finetune,ALPHA=None,TRAIN_FRACTION=0.5,SEED=0",
        "dsbs,ALPHA=0.3,TRAIN_FRACTION=1.0,SEED=0",
        "finetune,ALPHA=None,TRAIN_FRACTION=1.0,SEED=0",
        "dsbs,ALPHA=0.7,TRAIN_FRACTION=0.5,SEED=0",
        "dsbs,ALPHA=0.7,TRAIN_FRACTION=1.0,SEED=0",
    ]
    assert runs[0].bindings("cqa") == [
        '--gin.MIXTURE_OR_TASK_NAME="dsbs_cqa_step_by_step"',
        "--gin.ALPHA=0.3",
        "--gin.TRAIN_FRACTION=0.5",
        "--gin.SEED=0",
    ]
    with pytest.raises(ValueError, match="unknown method"):
        sweep.plan(["dsbs", "cot"], {})


def test_the_dataset_comes_from_the_run_configs_mixture():
    assert sweep.dataset_of("dsbs_cqa_step_by_step") == "cqa"
    assert sweep.dataset_of("dsbs_my_data_step_by_step_gt") == "my_data"
    assert sweep.dataset_of("dsbs_svamp_finetune") == "svamp"
    with pytest.raises(ValueError, match="which dataset"):
        sweep.dataset_of("glue_mrpc")


def _fake_run(root: Path, method: str, settings: dict, accuracy: float | None) -> None:
    run = sweep.Run(method, tuple(settings.items()))
    run_dir = root / run.name
    run_dir.mkdir(parents=True)
    (run_dir / results.RUN_FILE).write_text(json.dumps({"method": method, "settings": settings}))
    if accuracy is not None:
        (run_dir / results.TEST_RESULTS_FILE).write_text(
            json.dumps({"step": 300, "test/loss": 1.0, "test/t_label_llm/accuracy": accuracy})
        )


def test_aggregation_averages_over_seeds_only(tmp_path):
    for seed, (a, b) in enumerate([(40.0, 20.0), (50.0, 30.0), (60.0, 10.0)]):
        _fake_run(tmp_path, "dsbs", {"TRAIN_FRACTION": 0.5, "SEED": seed}, a)
        _fake_run(tmp_path, "finetune", {"TRAIN_FRACTION": 0.5, "SEED": seed}, b)
    _fake_run(tmp_path, "dsbs", {"TRAIN_FRACTION": 1.0, "SEED": 0}, 70.0)
    _fake_run(tmp_path, "dsbs", {"TRAIN_FRACTION": 1.0, "SEED": 1}, None)  # unfinished
    rows = results.aggregate(tmp_path)
    assert [(r.method, r.setting("TRAIN_FRACTION"), r.values) for r in rows] == [
        ("dsbs", 0.5, (40.0, 50.0, 60.0)),
        ("dsbs", 1.0, (70.0,)),
        ("finetune", 0.5, (20.0, 30.0, 10.0)),
    ]
    assert rows[0].mean == pytest.approx(50.0) and rows[0].std == pytest.approx(10.0)
    assert rows[1].std == 0.0
    table = results.markdown_table(rows)
    assert "| dsbs | 0.5 | 3 | 50.00 ± 10.00 |" in table
    assert "| finetune | 0.5 | 3 | 20.00 ± 10.00 |" in table


def test_a_run_with_several_label_metrics_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected one"):
        results.test_metric({"test/a/accuracy": 1.0, "test/b/accuracy": 2.0}, tmp_path)


def test_the_generated_label_metric_is_the_runs_and_a_scored_one_stands_in_alone(tmp_path):
    both = {"test/a/accuracy": 1.0, "test/a/score/accuracy": 2.0, "test/loss": 3.0}
    assert results.test_metric(both, tmp_path) == ("test/a/accuracy", 1.0)
    scored = {"test/a/score/accuracy": 2.0, "test/loss": 3.0}
    assert results.test_metric(scored, tmp_path) == ("test/a/score/accuracy", 2.0)


def _sweep_flags(data_dir: Path, sweep_dir: Path) -> list[str]:
    return [
        "--gin_file=runs/base.gin",
        "--gin_file=models/tiny.gin",
        f"--gin.DATA_DIR='{data_dir}'",
        f"--gin.MODEL_DIR='{sweep_dir}'",
        "--gin.MIXTURE_OR_TASK_NAME='dsbs_synthetic_step_by_step'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
        "--gin.TRAIN_STEPS=4",
        "--gin.EVAL_PERIOD=4",  # one validation pass a run
        "--gin.BATCH_SIZE=8",
        "--gin.LEARNING_RATE=1e-3",
        "--gin.train.eval_batch_size=32",
        "--gin.train.max_decode_length=4",
        "--methods=dsbs,finetune",
        "--sweep=TRAIN_FRACTION=[0.5,1.0]",
    ]


@pytest.mark.slow
def test_a_sweep_runs_skips_finished_runs_and_plots(gin_cache_root, tmp_path, capsys):
    """One method at two training fractions, two runs at a time, each a `python -m
    dsbs_jax.train` process (tests/test_vectorized.py runs several methods in one)."""
    sweep_dir = tmp_path / "sweep"
    flags = [f for f in _sweep_flags(gin_cache_root, sweep_dir) if not f.startswith("--methods")]
    flags.append("--methods=finetune")

    assert sweep.main([*flags, "--print_commands"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2 and all("-m dsbs_jax.train" in c for c in commands)
    assert all(c.count("MODEL_DIR") == 1 for c in commands)
    assert len(list(sweep_dir.glob("*/run.json"))) == 2  # recorded for --aggregate_only
    assert not list(sweep_dir.glob("*/checkpoint_*"))  # but nothing ran

    assert sweep.main([*flags, "--jobs=2"]) == 0
    assert "2 at a time" in capsys.readouterr().err
    logs = sorted(sweep_dir.glob(f"*/{sweep.RUN_LOG}"))
    assert len(logs) == 2 and all("test (checkpoint " in log.read_text() for log in logs)
    rows = results.aggregate(sweep_dir)
    assert [(r.method, r.setting("TRAIN_FRACTION"), len(r.values)) for r in rows] == [
        ("finetune", 0.5, 1),
        ("finetune", 1.0, 1),
    ]
    assert rows[0].metric == "test/dsbs_synthetic_label_gt/accuracy"
    finished = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/test_results.json")}
    assert len(finished) == 2
    plot = sweep_dir / results.FRACTION_PLOT
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    csv_lines = (sweep_dir / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("method,TRAIN_FRACTION,metric")

    # After losing one run's results (as if killed before its test), the sweep would run only
    # that one, resuming from its final checkpoint (tests/test_training.py resumes runs).
    lost = sweep_dir / "finetune,TRAIN_FRACTION=0.5" / results.TEST_RESULTS_FILE
    lost.unlink()
    assert sweep.main([*flags, "--check"]) == 0
    plan = capsys.readouterr().out
    assert "2 runs under" in plan and "1 finished, 1 to run" in plan
    assert plan.strip().splitlines()[1:] == ["  finetune,TRAIN_FRACTION=0.5: resumes checkpoint_4"]
    for path, mtime in finished.items():
        if path != lost:
            assert path.stat().st_mtime_ns == mtime


def test_a_sweep_over_an_undefined_macro_is_refused(gin_cache_root, tmp_path, capsys):
    flags = [*_sweep_flags(gin_cache_root, tmp_path), "--sweep=ALHPA=[0.3]"]
    assert sweep.main(flags) == 2
    assert "no macro ALHPA" in capsys.readouterr().err


def test_a_directory_holding_another_run_is_refused(gin_cache_root, tmp_path, capsys):
    flags = _sweep_flags(gin_cache_root, tmp_path)
    run_dir = tmp_path / "dsbs,TRAIN_FRACTION=0.5"
    run_dir.mkdir()
    (run_dir / results.RUN_FILE).write_text(json.dumps({"method": "dsbs", "flags": ["x"]}))
    assert sweep.main(flags) == 2
    assert "holds a run made with other flags" in capsys.readouterr().err


def test_the_headline_sweep_config_parses(gin_cache_root):
    import gin

    from dsbs_jax.gin_utils import parse_gin

    parse_gin(["sweeps/synthetic_data_efficiency.gin"], [], [])
    assert gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value") == "dsbs_synthetic_step_by_step"
    assert gin.query_parameter("TRAIN_STEPS/macro.value") == 1500


@pytest.mark.parametrize("mode", [[], ["--vectorized"]], ids=["separate", "vectorized"])
def test_finished_runs_made_with_other_flags_are_refused(gin_cache_root, tmp_path, capsys, mode):
    """Rerun with TRAIN_STEPS=6 over finished runs made with 4: one line naming the flags,
    instead of "4 finished, 0 to run" and the old results."""
    flags = _sweep_flags(gin_cache_root, tmp_path)
    assert sweep.main([*flags, "--print_commands"]) == 0  # records every run's flags
    for run_file in tmp_path.glob(f"*/{results.RUN_FILE}"):
        (run_file.parent / results.TEST_RESULTS_FILE).write_text(
            json.dumps({"step": 4, "test/dsbs_synthetic_label_llm/accuracy": 50.0})
        )
    capsys.readouterr()
    longer = [f.replace("TRAIN_STEPS=4", "TRAIN_STEPS=6") for f in flags]
    assert sweep.main([*longer, *mode]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "holds a run made with other flags" in line
    assert "(with --gin.TRAIN_STEPS=4, without --gin.TRAIN_STEPS=6)" in line
    assert sweep.main([*flags, *mode]) == 0  # the flags they were made with: all finished
    assert "4 finished, 0 to run" in capsys.readouterr().err


def test_check_prints_the_programs_and_runs_and_writes_nothing(gin_cache_root, tmp_path, capsys):
    flags = [f for f in _sweep_flags(gin_cache_root, tmp_path) if not f.startswith("--sweep")]
    flags.append("--sweep=TRAIN_STEPS=[4,6]")  # another step count: another program
    assert sweep.main([*flags, "--vectorized", "--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"check: the sweep of 4 runs under {tmp_path}: 0 finished, 4 to run"
    assert out[1].startswith("  program 1: 2 run(s) of 2+2 layers, emb_dim 32, batch 8 of 64/64")
    assert out[1].endswith("4 steps, mesh {'data': 8, 'model': 1}")
    assert out[2:4] == ["    dsbs,TRAIN_STEPS=4: new", "    finetune,TRAIN_STEPS=4: new"]
    assert out[4].startswith("  program 2: 2 run(s)") and "6 steps" in out[4]
    assert sweep.main([*flags, "--check"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"  {name}: new" for name in ("dsbs,TRAIN_STEPS=4", "finetune,TRAIN_STEPS=4")
    ] + [f"  {name}: new" for name in ("dsbs,TRAIN_STEPS=6", "finetune,TRAIN_STEPS=6")]
    assert not list(tmp_path.iterdir())
