"""The pod table: per model size, slice and optimizer, the cheapest settings XLA says fit.

    python -m dsbs_jax.pod_table --gin_file=runs/cqa_step_by_step.gin \\
        --gin.DATA_DIR='"/tmp/data"' --gin.VOCABULARY_PATH='"/tmp/data/synthetic/spm.model"' \\
        --gin.t5_config.vocab_size=32128 \\
        --results=pod_table.json --markdown=docs/pod_table.md

For every cell (T5 1.1 size x slice x optimizer) the train step of the run is compiled for the
slice by `python -m dsbs_jax.aot`, one process per try, so that a libtpu crash or a try past
`--timeout` is a result too. Tries go up `LADDER`, from the cheapest settings (no model
parallelism, nothing recomputed) to the most frugal, and stop at the first that fits (total
at most 95% of HBM). A cell stops early when even the float32 state split over every chip
(2-D parameter partitioning, t5x's ZeRO-3 style) leaves no room: no setting can fit then.

Every try is kept in `--results` as it finishes, so a run that is stopped resumes where it
was; `--markdown` renders the table from the results alone (`--render-only` skips compiling).
Every try scans the layers and takes attention logits in bfloat16 (t5x's default; libtpu
0.0.42.1 crashes on rematerialised float32 logits, docs/tpu.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dsbs_jax.aot import CHIPS, FIT_FRACTION, GiB, parse_topology
from dsbs_jax.errors import UserError

SIZES = ("small", "base", "large", "xl", "xxl")
SLICES = ("v4-8", "v4-32", "v5litepod-16", "v5litepod-64", "v5p-8", "v5p-32")
OPTIMIZERS = ("adamw", "adafactor")
BATCH_SIZE = 64  # the paper's
SKIPPED = "skipped: a smaller model does not fit"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a user changes to make a step fit: t5x's partitioning and remat knobs."""

    num_partitions: int
    parameter_partitioning_dims: int
    remat_policy: str
    activation_partitioning_dims: int = 1

    def gin_flags(self) -> list[str]:
        return [
            f"--gin.Partitioner.num_partitions={self.num_partitions}",
            f"--gin.Partitioner.parameter_partitioning_dims={self.parameter_partitioning_dims}",
            f"--gin.Partitioner.activation_partitioning_dims={self.activation_partitioning_dims}",
            f'--gin.t5_config.remat_policy="{self.remat_policy}"',
        ]

    def describe(self) -> str:
        """'mp4 p2 a2 full': partitions, parameter and activation dims, remat policy."""
        activations = " a2" if self.activation_partitioning_dims == 2 else ""
        return (
            f"mp{self.num_partitions} p{self.parameter_partitioning_dims}{activations} "
            f"{self.remat_policy}"
        )


# Cheapest first: more partitions mean more communication, 2-D parameters gather weights
# every layer, remat recomputes the forward pass ("minimal" keeps the weight dots, "full"
# nothing). Microbatches are left out: here they raised the peak (docs/tpu.md).
LADDER = (
    Settings(1, 1, "none"),
    Settings(1, 2, "none"),
    Settings(1, 2, "minimal"),
    Settings(1, 2, "full"),
    Settings(4, 2, "minimal"),
    Settings(4, 2, "full"),
    Settings(4, 2, "full", 2),
    Settings(8, 2, "full"),
    Settings(8, 2, "full", 2),
    Settings(16, 2, "full", 2),
)


def devices_of(slice_name: str) -> int:
    """JAX devices (chips) of a slice, as `dsbs_jax.aot` counts them."""
    _, topology = parse_topology(slice_name)
    count = 1
    for side in topology.split(":")[1].split("x"):
        count *= int(side)
    return count


def applicable(settings: Settings, devices: int) -> bool:
    """Whether the slice has the partitions and the batch splits over the rest."""
    data = devices // settings.num_partitions
    return (
        settings.num_partitions <= devices
        and data * settings.num_partitions == devices
        and (BATCH_SIZE % data == 0)
    )


def cell_key(size: str, slice_name: str, optimizer: str) -> str:
    return f"{size}/{slice_name}/{optimizer}"


def try_settings(
    gin_args: Sequence[str],
    size: str,
    slice_name: str,
    optimizer: str,
    settings: Settings,
    timeout: float,
) -> dict[str, Any]:
    """Compiles one train step in its own process: XLA's figures, or what went wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable,
            "-m",
            "dsbs_jax.aot",
            *gin_args,
            f"--gin_file=models/t5_1_1_{size}.gin",
            f'--gin.make_optimizer.name="{optimizer}"',
            f"--gin.BATCH_SIZE={BATCH_SIZE}",
            "--gin.train.num_microbatches=1",
            "--gin.t5_config.scan_layers=True",
            "--gin.t5_config.float32_attention_logits=False",
            *settings.gin_flags(),
            f"--topology={slice_name}",
            "--programs=train_step",
            f"--json={report}",
        ]
        outcome: dict[str, Any] = {"settings": dataclasses.asdict(settings)}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**outcome, "outcome": f"not compiled in {timeout:.0f} s"}
        if done.returncode or not report.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return {**outcome, "outcome": f"failed (exit {done.returncode}): {last}"}
        program = json.loads(report.read_text())["programs"]["train_step"]
    keep = ("fits", "total_bytes", "hbm_bytes", "argument_bytes", "temp_bytes", "compile_seconds")
    return {
        **outcome,
        "outcome": "fits" if program["fits"] else "does not fit",
        **{k: program[k] for k in keep},
    }


def state_leaves_no_room(tried: dict[str, Any]) -> bool:
    """Whether a try with every chip holding 1/chips of the state already has no room for
    the step: its arguments (parameters and optimizer state) alone exceed the fit line."""
    settings = tried["settings"]
    return (
        settings["parameter_partitioning_dims"] == 2
        and tried.get("argument_bytes") is not None
        and tried["argument_bytes"] > FIT_FRACTION * tried["hbm_bytes"]
    )


def search_cell(
    gin_args: Sequence[str],
    size: str,
    slice_name: str,
    optimizer: str,
    timeout: float,
    done_tries: Sequence[dict[str, Any]] = (),
    too_big: Sequence[dict[str, Any]] = (),
) -> Iterator[dict[str, Any]]:
    """Tries `LADDER` for one cell and yields each new try; stops after the first that fits
    or once no setting can. Tries already in `done_tries` are not repeated, and settings in
    `too_big` (ones a smaller model did not fit on the slice) are not tried."""
    tried = {Settings(**t["settings"]): t for t in done_tries}
    skip = {Settings(**settings) for settings in too_big}
    devices = devices_of(slice_name)
    for settings in LADDER:
        if not applicable(settings, devices):
            continue
        if settings in skip and settings not in tried:
            yield {"settings": dataclasses.asdict(settings), "outcome": SKIPPED}
            continue
        result = tried.get(settings) or try_settings(
            gin_args, size, slice_name, optimizer, settings, timeout
        )
        if settings not in tried:
            yield result
        if result.get("fits") or state_leaves_no_room(result):
            return


def ladder_rank(settings: Settings) -> int:
    """Place on `LADDER`, cheapest 0; settings off the ladder come after it."""
    return LADDER.index(settings) if settings in LADDER else len(LADDER)


def fitting_try(tries: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The cheapest try that fits (tries compiled by hand may come first in the list)."""
    fits = [t for t in tries if t.get("fits")]
    return min(fits, key=lambda t: ladder_rank(Settings(**t["settings"])), default=None)


def cell_summary(tries: Sequence[dict[str, Any]], devices: int) -> str:
    """One table cell: the fitting settings and their share of HBM, or why none fits.

    A fit found before the cheaper settings of the ladder were tried (one compiled by hand)
    says so."""
    fit = fitting_try(tries)
    if fit is not None:
        settings = Settings(**fit["settings"])
        share = fit["total_bytes"] / fit["hbm_bytes"]
        done = {Settings(**t["settings"]) for t in tries}
        untried = [
            s for s in LADDER[: ladder_rank(settings)] if applicable(s, devices) and s not in done
        ]
        note = "; cheaper settings not tried yet" if untried else ""
        return f"{settings.describe()}: {fit['total_bytes'] / GiB:.1f} GiB ({share:.0%}{note})"
    for tried in tries:
        if state_leaves_no_room(tried):
            return f"no: state alone {tried['argument_bytes'] / GiB:.1f} GiB a chip"
    if not tries:
        return "not compiled yet"
    smallest = min(
        (t for t in tries if t.get("total_bytes")), key=lambda t: t["total_bytes"], default=None
    )
    if smallest is None:
        return f"no verdict: {tries[-1]['outcome']}"
    settings = Settings(**smallest["settings"])
    return f"no: at least {smallest['total_bytes'] / GiB:.1f} GiB ({settings.describe()})"


def render_markdown(
    results: dict[str, list[dict[str, Any]]], sizes: Sequence[str], slices: Sequence[str]
) -> str:
    """The page: the table per optimizer, model sizes down, slices across."""
    lines = [
        "# The pod table",
        "",
        "Written by `python -m dsbs_jax.pod_table` from its results (see [TPU pods](tpu.md));",
        "do not edit. Each cell gives the cheapest settings of its ladder that XLA fits (total",
        "at most 95% of HBM) for the train step of the run file it was given, with scanned",
        "layers and bfloat16 attention logits, and XLA's total per chip.",
        "`mpN`: N model partitions; `p2`: 2-D parameter partitioning; `a2`: 2-D activation",
        "partitioning; `none`, `minimal`, `full`: the remat policy.",
        "",
    ]
    for optimizer in OPTIMIZERS:
        header = [
            f"{s} ({devices_of(s)} chips, {CHIPS[parse_topology(s)[0]].hbm_bytes // GiB} GiB)"
            for s in slices
        ]
        lines += [
            f"#### {'AdamW (the paper)' if optimizer == 'adamw' else 'Adafactor (t5x)'}",
            "",
            "| model | " + " | ".join(header) + " |",
            "|---|" + "---|" * len(slices),
        ]
        for size in sizes:
            cells = [
                cell_summary(results.get(cell_key(size, s, optimizer), []), devices_of(s))
                for s in slices
            ]
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def pod_file_stem(slice_name: str) -> str:
    """'v5e_16' for v5litepod-16: the name of the slice's file in gin_configs/pods/."""
    generation, _ = parse_topology(slice_name)
    return f"{generation}_{slice_name.rsplit('-', 1)[1]}"


def write_pod_files(results: dict[str, list[dict[str, Any]]], directory: Path) -> list[Path]:
    """One gin file per model size and slice where AdamW fits (`<slice>_<size>.gin`): the
    slice's file, the model and the settings found, with Adafactor's in a comment."""
    written = []
    for size in SIZES:
        for slice_name in SLICES:
            adamw = fitting_try(results.get(cell_key(size, slice_name, "adamw"), []))
            if adamw is None:
                continue
            stem = pod_file_stem(slice_name)
            settings = Settings(**adamw["settings"])
            devices = devices_of(slice_name)
            found = {
                optimizer: cell_summary(
                    results.get(cell_key(size, slice_name, optimizer), []), devices
                )
                for optimizer in OPTIMIZERS
            }
            path = directory / f"{stem}_{size}.gin"
            path.write_text(
                f"# T5 1.1 {size} on a TPU {slice_name}, settings XLA fits (total per chip), as\n"
                "# `python -m dsbs_jax.pod_table` found them (docs/pod_table.md; written by it).\n"
                f"# AdamW, set here: {found['adamw']}.\n"
                f'# Adafactor (--gin.make_optimizer.name=\\"adafactor\\"): {found["adafactor"]}.\n'
                "# It replaces the run file's model. Add after the run file:\n"
                "#   python -m dsbs_jax.train --gin_file=runs/cqa_step_by_step.gin "
                f"--gin_file=pods/{path.name} ...\n"
                f"include 'pods/{stem}.gin'\n"
                f"include 'models/t5_1_1_{size}.gin'\n\n"
                "t5_config.scan_layers = True\n"
                "t5_config.float32_attention_logits = False\n"
                f't5_config.remat_policy = "{settings.remat_policy}"\n'
                f"Partitioner.num_partitions = {settings.num_partitions}\n"
                "Partitioner.parameter_partitioning_dims = "
                f"{settings.parameter_partitioning_dims}\n"
                "Partitioner.activation_partitioning_dims = "
                f"{settings.activation_partitioning_dims}\n"
                "train.num_microbatches = 1\n"
            )
            written.append(path)
    return written


def _names(value: str, known: Sequence[str], what: str) -> list[str]:
    names = [n for n in value.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UserError(f"--{what}: unknown {unknown or value!r}; choose from {','.join(known)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsbs_jax.pod_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--results", type=Path, required=True, help="JSON of every try (resumed)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--slices", default=",".join(SLICES))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per compile")
    parser.add_argument("--render-only", action="store_true", help="compile nothing")
    parser.add_argument(
        "--pods", type=Path, default=None, help="write <slice>_<size>.gin files here"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, gin_args = parser.parse_known_args(argv)
    stray = [a for a in gin_args if not a.startswith(("--gin_file", "--gin.", "--gin_search_path"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    try:
        sizes = _names(args.sizes, SIZES, "sizes")
        slices = _names(args.slices, SLICES, "slices")
        optimizers = _names(args.optimizers, OPTIMIZERS, "optimizers")
    except UserError as e:
        parser.error(str(e))
    if not gin_args and not args.render_only:
        parser.error(
            "give the run's gin files and flags, e.g. --gin_file=runs/cqa_step_by_step.gin"
        )
    results: dict[str, list[dict[str, Any]]] = (
        json.loads(args.results.read_text()) if args.results.is_file() else {}
    )
    cells = [(z, s, o) for z in sizes for s in slices for o in optimizers]  # quick ones first
    if not args.render_only:
        for size, slice_name, optimizer in tqdm(cells, desc="pod table", unit="cell"):
            tries = results.setdefault(cell_key(size, slice_name, optimizer), [])
            smaller = SIZES[: SIZES.index(size)]
            too_big = [  # a larger model needs more memory with the same settings
                t["settings"]
                for z in smaller
                for t in results.get(cell_key(z, slice_name, optimizer), [])
                if t["outcome"] == "does not fit"
            ]
            found = search_cell(gin_args, size, slice_name, optimizer, args.timeout, tries, too_big)
            for tried in found:
                tries.append(tried)
                partial = args.results.with_suffix(".tmp")
                partial.write_text(json.dumps(results, indent=1) + "\n")
                partial.replace(args.results)  # whole or not at all, if interrupted
                what = Settings(**tried["settings"]).describe()
                tqdm.write(f"{cell_key(size, slice_name, optimizer)} {what}: {tried['outcome']}")
    table = render_markdown(results, sizes, slices)
    if args.markdown:
        args.markdown.write_text(table)
    if args.pods:
        for path in write_pod_files(results, args.pods):
            print(f"wrote {path}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
