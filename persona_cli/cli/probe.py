"""Reward-hack probe commands (experiment 4): `probe teacher-pool`, `extract-vhack`,
`probe replay`, `probe-uat`.

Thin layers over persona_cli.probe: parse options, build a frozen config, call one function.

    persona-cli probe teacher-pool --model tiny-random --n-problems 4 -g 2 --steps 2 \
        --out runs/pool
    persona-cli extract-vhack --pool runs/pool --model tiny-random --adapter svd --out runs/vhack
    persona-cli probe replay --pool runs/pool --vhack runs/vhack --out runs/replay_vanilla
    persona-cli probe replay --pool runs/pool --vhack runs/vhack --projected --out runs/replay_proj
    persona-cli probe-uat --pool runs/pool --vanilla runs/replay_vanilla \\
        --projected runs/replay_proj --out runs/uat
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from persona_cli.cli.console import ProgressDisplay, console, err_console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.errors import EXIT_CHECK_FAILED, UserError
from persona_cli.probe.arms import ArmsJob
from persona_cli.probe.config import ExtractJob, ReplayJob, TeacherPoolConfig, UATJob

# The `probe` sub-app: `probe teacher-pool` and `probe replay` (registered at the end).
app = typer.Typer(
    help="Reward-hack probe stages: teacher pool and per-step gradient replay.",
    no_args_is_help=True,
)


def _layers(value: str) -> tuple[int, ...] | None:
    if value == "all":
        return None
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise UserError(f"--layers {value!r}: expected 'all' or comma-separated indices") from None


@configured(
    TeacherPoolConfig,
    flags={
        "generation.n": "--generations -g",
    },
    parsers={"hint": lambda v: None if v == "none" else v},
)
def teacher_pool(cfg: TeacherPoolConfig, out: Path, force: bool) -> None:
    """Stage a: a teacher writes G completions per problem per step; the sandbox labels each.

    Writes step_NNNNNN.jsonl.gz (prompt, completion, hacked, gt_pass, reward, category, token
    counts), summary.json, manifest.json and DONE. A killed pool resumes at the first missing
    step.
    """
    from persona_cli.probe.teacher_pool import run_teacher_pool

    with ProgressDisplay("probe teacher-pool") as display:
        result = run_teacher_pool(cfg, out, force=force, progress=display)
    if result.already_done:
        say_already_done(result.run.path)
    elif result.reused_steps:
        err_console.print(f"resumed: steps {result.reused_steps} were already written")
    table = Table(title="teacher pool")
    for col in ("step", "rows", "hacked", "hack rate", "gt_pass", "hacked & gt_pass", "reward"):
        table.add_column(col, justify="right")
    s = result.summary
    for row in [*s["steps"], {"step": "all", **s["overall"]}]:
        table.add_row(
            str(row["step"]),
            str(row["rows"]),
            str(row["hacked"]),
            _fmt(row["hack_rate"]),
            str(row["gt_pass"]),
            str(row["hacked_gt_pass"]),
            _fmt(row["mean_reward"]),
        )
    console.print(table)
    console.print(f"pool: {result.run.path}", highlight=False)


@configured(
    ExtractJob,
    flags={"extract.model": "--model -m", "extract.adapter.kind": "--adapter"},
    parsers={"extract.adapter.layers": _layers},
)
def extract_vhack(cfg: ExtractJob, out: Path, force: bool) -> None:
    """Per-module hack direction v_hack from hack and clean completions -> v_hack.safetensors."""
    from persona_cli.probe.extract import extract_vhack as run_extract

    with ProgressDisplay("extract-vhack") as display:
        result = run_extract(cfg, out, force=force, progress=display)
    if result.already_done:
        say_already_done(result.run.path)
    s = result.summary
    console.print(
        f"v_hack: {s['counts']['hack']} hack / {s['counts']['clean']} clean rows "
        f"({s['counts']['skipped']} skipped), |v| = {s['norm']:.4g}, "
        f"{s['adapter']['modules']} modules -> {result.run.file('v_hack.safetensors')}",
        highlight=False,
    )


@configured(
    ReplayJob,
)
def replay(cfg: ReplayJob, out: Path, force: bool) -> None:
    """Replay a pool step by step: per-sample gradient cosines with v_hack, optional projection."""
    from persona_cli.probe.replay import replay as run_replay

    config = cfg.replay
    with ProgressDisplay("probe replay") as display:
        result = run_replay(cfg, out, force=force, progress=display)
    if result.already_done:
        say_already_done(result.run.path)
    table = Table(
        title=f"probe replay ({'projected' if config.projected else 'vanilla'}, {config.loss})"
    )
    for col in (
        "step",
        "rows",
        "hack rate",
        "mean cos",
        "cos hack",
        "cos clean",
        "cos_in",
        "cos_out",
        "frac fired",
    ):
        table.add_column(col, justify="right")
    for s in result.summary["steps"]:
        table.add_row(
            str(s["step"]),
            str(s["rows"]),
            *(
                _fmt(s[k])
                for k in (
                    "hack_rate",
                    "mean_cos",
                    "mean_cos_hacked",
                    "mean_cos_clean",
                    "mean_cos_in",
                    "mean_cos_out",
                    "frac_fired",
                )
            ),
        )
    console.print(table)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


@configured(UATJob)
def probe_uat(cfg: UATJob, out: Path, force: bool) -> None:
    """Acceptance checks T1-T4 of the probe; exit 1 when any fails (report: uat.json)."""
    from persona_cli.probe.uat import run_uat

    result = run_uat(cfg, out, force=force)
    if result.already_done:
        say_already_done(result.run.path)
    table = Table(title="probe-uat")
    for col in ("check", "claim", "value", "threshold", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in result.report["checks"]:
        table.add_row(
            c["name"],
            c["claim"],
            _fmt(c["value"]),
            f"{c['threshold']:g}",
            "[green]PASS[/]" if c["passed"] else "[bold red]FAIL[/]",
            escape(c["detail"]),
        )
    console.print(table)
    for c in result.report["checks"]:
        console.print(f"{c['name']} guards against: {c['guards']}", highlight=False)
    console.print(f"report: {result.run.file('uat.json')}", highlight=False)
    if not result.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


app.command("teacher-pool")(teacher_pool)
app.command("replay")(replay)


@configured(
    ArmsJob,
    arguments={"runs"},
    flags={"comparison.test": "--test", "comparison.alternative": "--alternative"},
)
def compare_arms(cfg: ArmsJob, out: Path, force: bool) -> None:
    """Training arms head to head: per-step hack-rate trajectories with Wilson bands, the arms
    tested at chosen steps across seeds, and a PNG (train-grpo runs); per-step cosine
    trajectories (probe replay runs). Only --arm-field may differ between the runs' protocols.
    """
    from persona_cli.probe.arms import compare_arms as run_compare
    from persona_cli.stats import describe_test, format_p

    result = run_compare(cfg, out, force=force)
    if result.already_done:
        say_already_done(result.run.path)
    s = result.summary
    table = Table(title=f"compare-arms ({s['arm_field']}; {s['kind']})")
    if s["kind"] == "rl":
        cols = (
            "arm",
            "step",
            "seeds",
            "hacks / n",
            "hack rate",
            "Wilson band",
            "cos_in",
            "cos_out",
        )
    else:
        cols = ("arm", "step", "mean cos", "cos_in", "cos_out", "frac fired")
    for col in cols:
        table.add_column(col, justify="right")
    for arm, points in s["trajectories"].items():
        for p in points:
            if s["kind"] == "rl":
                table.add_row(
                    arm,
                    str(p["step"]),
                    str(p["seeds"]),
                    f"{p['hacks']} / {p['completions']}",
                    _fmt(p["rate"]),
                    f"{p['low']:.3f}-{p['high']:.3f}",
                    _fmt(p["proj_cos_in"]),
                    _fmt(p["proj_cos_out"]),
                )
            else:
                table.add_row(
                    arm,
                    str(p["step"]),
                    *(
                        _fmt(p[k])
                        for k in ("mean_cos", "mean_cos_in", "mean_cos_out", "frac_fired")
                    ),
                )
    console.print(table)
    if s["comparisons"]:
        tests = Table(title="arm vs reference at the chosen steps")
        for col in ("step", "arm", "reference", "rate", "ref rate", "diff", "test", "p"):
            tests.add_column(col, overflow="fold")
        for c in s["comparisons"]:
            head = c["headline"]
            tests.add_row(
                str(c["step"]),
                c["arm"],
                c["reference"],
                _fmt(c["rate"]),
                _fmt(c["reference_rate"]),
                _fmt(c["diff"]),
                describe_test(head) if head else "-",
                format_p(head["p_value"]) if head else "-",
            )
        console.print(tests)
        for note in dict.fromkeys(c["note"] for c in s["comparisons"] if c["note"]):
            console.print(f"note: {note}", highlight=False)
    console.print(f"plot: {result.run.file('arms.png')}", highlight=False)


app.command("compare-arms")(compare_arms)
