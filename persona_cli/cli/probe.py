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

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from persona_cli.cli.console import CompletionBar, console, err_console
from persona_cli.cli.options import Adapters, Force, OutDir, generation_config, say_already_done
from persona_cli.errors import EXIT_CHECK_FAILED, UserError
from persona_cli.generate.config import GenerationConfig
from persona_cli.probe.config import (
    AdapterConfig,
    ExtractConfig,
    ReplayConfig,
    TeacherPoolConfig,
    UATConfig,
    field_help,
)

# The `probe` sub-app: `probe teacher-pool` and `probe replay` (registered at the end).
app = typer.Typer(
    help="Reward-hack probe stages: teacher pool and per-step gradient replay.",
    no_args_is_help=True,
)


def _opt(cls: type, name: str, *flags: str) -> Any:
    # Help and the shown default come from the config dataclass, where the defaults live.
    text, shown = field_help(cls, name)
    return typer.Option(*flags, help=escape(text), show_default=shown or False)


def _given(cls: type, **values: Any) -> Any:
    """The config with every option the user set; unset (None) keeps the dataclass default."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if v is not None and k in names})


def _csv(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(x.strip() for x in value.split(",") if x.strip())


def _layers(value: str | None) -> tuple[int, ...] | None:
    if value is None or value == "all":
        return None
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise UserError(f"--layers {value!r}: expected 'all' or comma-separated indices") from None


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


_POOL_GEN = TeacherPoolConfig().generation


def _gen_opt(name: str, *flags: str, help: str | None = None) -> Any:
    # Sampling help and defaults live in GenerationConfig (the pool's own default for n).
    return typer.Option(
        *flags,
        help=escape(help or GenerationConfig.help()[name]),
        show_default=str(getattr(_POOL_GEN, name)),
    )


def teacher_pool(
    out: OutDir,
    model: Annotated[str | None, _opt(TeacherPoolConfig, "model", "--model", "-m")] = None,
    adapter: Adapters = None,
    problems: Annotated[Path | None, _opt(TeacherPoolConfig, "problems", "--problems")] = None,
    problem_ids: Annotated[
        str | None, _opt(TeacherPoolConfig, "problem_ids", "--problem-ids")
    ] = None,
    n_problems: Annotated[int | None, _opt(TeacherPoolConfig, "n_problems", "--n-problems")] = None,
    generations: Annotated[
        int | None,
        _gen_opt("n", "--generations", "-g", help="Completions per problem and step (G)."),
    ] = None,
    steps: Annotated[int | None, _opt(TeacherPoolConfig, "steps", "--steps")] = None,
    hint: Annotated[str | None, _opt(TeacherPoolConfig, "hint", "--hint")] = None,
    system_prompt: Annotated[
        str | None, _opt(TeacherPoolConfig, "system_prompt", "--system-prompt")
    ] = None,
    max_new_tokens: Annotated[int | None, _gen_opt("max_new_tokens", "--max-new-tokens")] = None,
    temperature: Annotated[float | None, _gen_opt("temperature", "--temperature")] = None,
    top_p: Annotated[float | None, _gen_opt("top_p", "--top-p")] = None,
    batch_size: Annotated[int | None, _gen_opt("batch_size", "--batch-size")] = None,
    seed: Annotated[
        int | None,
        _gen_opt("seed", "--seed", help="Run seed: each step's problems and sampling seed."),
    ] = None,
    workers: Annotated[int | None, _opt(TeacherPoolConfig, "workers", "--workers")] = None,
    force: Force = False,
) -> None:
    """Stage a: a teacher writes G completions per problem per step; the sandbox labels each.

    Writes step_NNNNNN.jsonl.gz (prompt, completion, hacked, gt_pass, reward, category, token
    counts), summary.json, manifest.json and DONE. A killed pool resumes at the first missing
    step.
    """
    from persona_cli.probe.teacher_pool import run_teacher_pool

    generation = generation_config(
        _POOL_GEN,
        n=generations,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
    )
    config = _given(
        TeacherPoolConfig,
        model=model,
        adapters=tuple(str(a) for a in adapter) if adapter else None,
        problems=str(problems) if problems else None,
        problem_ids=_csv(problem_ids),
        n_problems=n_problems,
        steps=steps,
        system_prompt=system_prompt,
        workers=workers,
        generation=generation,
    )
    if hint is not None:  # "none" is a choice (no hint), so it cannot mean "unset"
        config = replace(config, hint=None if hint == "none" else hint)
    with CompletionBar(["generated", "graded"], "probe teacher-pool") as bar:
        result = run_teacher_pool(config, out, force=force, on_plan=bar.plan, progress=bar.advance)
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


PoolDir = Annotated[
    Path | None,
    typer.Option(
        "--pool", help="Teacher-pool run directory (step_NNNNNN.jsonl.gz rows).", show_default=False
    ),
]


def extract_vhack(
    out: OutDir,
    pool: PoolDir = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="JSONL of {prompt, hack, clean} rows instead of a pool.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[str | None, _opt(ExtractConfig, "model", "--model", "-m")] = None,
    adapter: Annotated[str | None, _opt(AdapterConfig, "kind", "--adapter")] = None,
    rank: Annotated[int | None, _opt(AdapterConfig, "rank", "--rank")] = None,
    alpha: Annotated[float | None, _opt(AdapterConfig, "alpha", "--alpha")] = None,
    targets: Annotated[str | None, _opt(AdapterConfig, "targets", "--targets")] = None,
    layers: Annotated[str | None, _opt(AdapterConfig, "layers", "--layers")] = None,
    seed: Annotated[int | None, _opt(AdapterConfig, "seed", "--seed")] = None,
    loss: Annotated[str | None, _opt(ExtractConfig, "loss", "--loss")] = None,
    batch_size: Annotated[int | None, _opt(ExtractConfig, "batch_size", "--batch-size")] = None,
    max_length: Annotated[int | None, _opt(ExtractConfig, "max_length", "--max-length")] = None,
    force: Force = False,
) -> None:
    """Per-module hack direction v_hack from hack and clean completions -> v_hack.safetensors."""
    from persona_cli.probe.extract import extract_vhack as run_extract

    adapter_cfg = _given(
        AdapterConfig,
        kind=adapter,
        rank=rank,
        alpha=alpha,
        targets=_csv(targets),
        layers=_layers(layers),
        seed=seed,
    )
    config = _given(
        ExtractConfig,
        model=model,
        adapter=adapter_cfg,
        loss=loss,
        batch_size=batch_size,
        max_length=max_length,
    )
    with _progress("gradients") as progress:
        result = run_extract(
            out, config=config, pool=pool, pairs=pairs, force=force, progress=progress
        )
    if result.already_done:
        say_already_done(result.run.path)
    s = result.summary
    console.print(
        f"v_hack: {s['counts']['hack']} hack / {s['counts']['clean']} clean rows "
        f"({s['counts']['skipped']} skipped), |v| = {s['norm']:.4g}, "
        f"{s['adapter']['modules']} modules -> {result.run.file('v_hack.safetensors')}",
        highlight=False,
    )


def replay(
    out: OutDir,
    pool: Annotated[
        Path, typer.Option("--pool", help="Teacher-pool run directory.", show_default=False)
    ],
    vhack: Annotated[
        Path,
        typer.Option(
            "--vhack", help="extract-vhack run directory or v_hack.safetensors.", show_default=False
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model spec (default: the one v_hack was extracted on).",
            show_default=False,
        ),
    ] = None,
    loss: Annotated[str | None, _opt(ReplayConfig, "loss", "--loss")] = None,
    projected: Annotated[
        bool | None, _opt(ReplayConfig, "projected", "--projected/--no-projected")
    ] = None,
    project_when: Annotated[
        str | None, _opt(ReplayConfig, "project_when", "--project-when")
    ] = None,
    optimizer: Annotated[str | None, _opt(ReplayConfig, "optimizer", "--optimizer")] = None,
    lr: Annotated[float | None, _opt(ReplayConfig, "lr", "--lr")] = None,
    weight_decay: Annotated[
        float | None, _opt(ReplayConfig, "weight_decay", "--weight-decay")
    ] = None,
    batch_size: Annotated[int | None, _opt(ReplayConfig, "batch_size", "--batch-size")] = None,
    max_length: Annotated[int | None, _opt(ReplayConfig, "max_length", "--max-length")] = None,
    max_steps: Annotated[int | None, _opt(ReplayConfig, "max_steps", "--max-steps")] = None,
    grad_method: Annotated[str | None, _opt(ReplayConfig, "grad_method", "--grad-method")] = None,
    force: Force = False,
) -> None:
    """Replay a pool step by step: per-sample gradient cosines with v_hack, optional projection."""
    from persona_cli.probe.replay import replay as run_replay

    config = _given(
        ReplayConfig,
        loss=loss,
        projected=projected,
        project_when=project_when,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        max_length=max_length,
        max_steps=max_steps,
        grad_method=grad_method,
    )
    with _progress("replay steps") as progress:
        result = run_replay(
            out, pool=pool, vhack=vhack, config=config, model=model, force=force, progress=progress
        )
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


def probe_uat(
    out: OutDir,
    pool: Annotated[
        Path, typer.Option("--pool", help="Teacher-pool run directory.", show_default=False)
    ],
    vanilla: Annotated[
        Path, typer.Option("--vanilla", help="Vanilla probe replay run.", show_default=False)
    ],
    projected: Annotated[
        Path, typer.Option("--projected", help="Projected probe replay run.", show_default=False)
    ],
    t1: Annotated[float | None, _opt(UATConfig, "t1_min_hack_rate", "--t1-min-hack-rate")] = None,
    t2: Annotated[float | None, _opt(UATConfig, "t2_min_coverage", "--t2-min-coverage")] = None,
    t3: Annotated[
        float | None, _opt(UATConfig, "t3_min_step_fraction", "--t3-min-step-fraction")
    ] = None,
    t4: Annotated[float | None, _opt(UATConfig, "t4_alpha", "--t4-alpha")] = None,
    force: Force = False,
) -> None:
    """Acceptance checks T1-T4 of the probe; exit 1 when any fails (report: uat.json)."""
    from persona_cli.probe.uat import run_uat

    config = _given(
        UATConfig, t1_min_hack_rate=t1, t2_min_coverage=t2, t3_min_step_fraction=t3, t4_alpha=t4
    )
    result = run_uat(
        out, pool=pool, vanilla=vanilla, projected=projected, config=config, force=force
    )
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
