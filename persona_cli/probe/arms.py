"""`probe compare-arms`: training arms head to head, step by step (DESIGN.md experiment 8).

    persona-cli probe compare-arms runs/rl/vanilla_seed42 runs/rl/projected_seed42 ... \\
        --arm-field projection --steps 50,100 --out runs/rl/arms

The runs are finished run directories, all train-grpo (or train-sdpo) runs, or all `probe
replay` runs. A run's arm is the value of the guarded protocol field `--arm-field` (projection:
vanilla vs projected; adapter_kind: LoRA vs SVD); every other guarded field must agree
(`persona_cli.guard`: a mismatch is refused, exit 3). A run's seed is its manifest's; seeds are
the unit of replication, one run per (arm, seed).

GRPO runs, recomputed from the raw rows of the step files (the policy's own completions, or all
with `--completions all`; the sandbox labels are required):

- per run and step: hacks (category_strict == "hack"; category_loose with `--label loose`) and
  completions;
- per arm and step: the counts pooled over seeds with a Wilson interval (`stats.proportion_
  interval`), the per-seed rates, and the mean over seeds of the logged update cosines
  (`proj_cos_in`, `proj_cos_out` of rl_log, where the run logged them);
- at each `--steps` step (default: the last step every run has), each arm against the first arm
  (the reference, in the order the runs were given) by `stats.seed_comparison`: Welch's t-test
  on the per-seed rates where both arms have two or more seeds, else the count test on pooled
  completions, labelled as pooled.

`probe replay` runs: per arm and step the mean plain cosine and the mean cos_in / cos_out of the
rows (`persona_cli.probe.steps.step_stats`), the trajectory of the replay's cosines.

Writes `trajectories.jsonl.gz` (one row per run and step), `summary.json`, `arms.png`, the
manifest (every run's protocol and the declared difference) and DONE.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from persona_cli.artifacts import read_json, read_jsonl, write_bytes_atomic, write_json, write_jsonl
from persona_cli.comparison import ComparisonConfig
from persona_cli.errors import InputError, UserError
from persona_cli.guard import check_allow_diff, guard_protocols, protocol_of
from persona_cli.protocol import details, method_protocol
from persona_cli.rundir import RunDir, is_done, open_run
from persona_cli.schemas import MANIFEST, STEP

COMMAND = "probe compare-arms"
SUMMARY_VERSION = 1
RL_COMMANDS = ("train-grpo", "train-sdpo")
REPLAY = "probe replay"
_STEP_FILE = re.compile(r"step_(\d{6})\.jsonl\.gz")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ArmsJob:
    """probe compare-arms: which runs, what defines an arm, and what is compared."""

    runs: tuple[str, ...] = _f((), "Finished train-grpo (or probe replay) run directories.")
    arm_field: str = _f(
        "projection",
        "The guarded protocol field that defines the arms (projection, adapter_kind, ...); the "
        "only field allowed to differ.",
    )
    steps: tuple[int, ...] = _f(
        (), "Steps at which the arms are tested (default: the last step every run has)."
    )
    label: str = _f("strict", "Hack label: strict (category_strict) or loose (category_loose).")
    completions: str = _f(
        "policy", "policy (the policy's own completions) or all (generators' too)."
    )
    alpha: float = _f(0.05, "1 - confidence level of the Wilson bands.")
    comparison: ComparisonConfig = field(
        default_factory=ComparisonConfig, metadata={"help": "How two arms are tested."}
    )

    def check(self) -> ArmsJob:
        if len(self.runs) < 2:
            raise UserError("compare-arms: give two or more run directories")
        if self.label not in ("strict", "loose"):
            raise UserError(f"--label {self.label!r}: choose strict or loose")
        if self.completions not in ("policy", "all"):
            raise UserError(f"--completions {self.completions!r}: choose policy or all")
        if not 0 < self.alpha < 1:
            raise UserError(f"--alpha: must be in (0, 1), got {self.alpha}")
        if any(s < 1 for s in self.steps):
            raise UserError("--steps: steps count from 1")
        self.comparison.check()
        check_allow_diff([self.arm_field])
        return self


@dataclass
class ArmsResult:
    run: RunDir
    summary: dict[str, Any]
    already_done: bool = False


@dataclass(frozen=True)
class RunInfo:
    path: Path
    command: str
    arm: str
    seed: int


def _runs(job: ArmsJob) -> tuple[list[RunInfo], list[Any]]:
    """The runs with their arm and seed, after the protocol guard."""
    paths = [Path(r) for r in job.runs]
    for p in paths:
        if not is_done(p):
            raise UserError(f"{p}: not a finished run directory (no DONE)")
    allowed = guard_protocols({str(p): protocol_of(p) for p in paths}, [job.arm_field])
    infos = []
    for p in paths:
        manifest = read_json(p / MANIFEST)
        proto = protocol_of(p)
        if job.arm_field not in proto:
            raise InputError(p / MANIFEST, f"no protocol field {job.arm_field!r} to make arms of")
        seeds = manifest.get("seeds") or [None]
        infos.append(RunInfo(p, manifest["command"], str(proto[job.arm_field]), seeds[0]))
    kinds = {"rl" if i.command in RL_COMMANDS else i.command for i in infos}
    if len(kinds) > 1 or not kinds <= {"rl", REPLAY}:
        raise UserError(
            "compare-arms: runs must all be train-grpo/train-sdpo runs or all probe replay runs "
            f"(got {', '.join(sorted({i.command for i in infos}))})"
        )
    seen: dict[tuple[str, Any], Path] = {}
    for i in infos:
        if (i.arm, i.seed) in seen:
            raise UserError(
                f"{i.path}: arm {job.arm_field}={i.arm} seed {i.seed} already given by "
                f"{seen[(i.arm, i.seed)]}; one run per arm and seed"
            )
        seen[(i.arm, i.seed)] = i.path
    if len({i.arm for i in infos}) < 2:
        raise UserError(f"compare-arms: every run has {job.arm_field}={infos[0].arm}; one arm")
    return infos, allowed


def _step_files(run: Path) -> dict[int, Path]:
    found = {int(m.group(1)): p for p in run.iterdir() if (m := _STEP_FILE.fullmatch(p.name))}
    if not found:
        raise InputError(run, "no step_NNNNNN.jsonl.gz rows")
    return dict(sorted(found.items()))


def rl_trajectory(info: RunInfo, job: ArmsJob) -> list[dict[str, Any]]:
    """One row per step of a GRPO run: hacks and completions from its raw rows, the logged
    update cosines."""
    from persona_cli.train.rl_log import RL_LOG, RL_LOG_NAME

    key = "category_strict" if job.label == "strict" else "category_loose"
    logged = {r["step"]: r for r in read_jsonl(info.path / RL_LOG_NAME, RL_LOG.check)}
    out = []
    for step, path in _step_files(info.path).items():
        rows = read_jsonl(path, STEP.check)
        if job.completions == "policy":
            rows = [r for r in rows if r.get("generator", "policy") == "policy"]
        missing = [r for r in rows if key not in r]
        if missing:
            raise InputError(
                path,
                f"row {missing[0]['sample_index']} has no sandbox label {key!r}: compare-arms "
                "needs train-grpo --reward unit-tests runs",
            )
        log = logged.get(step, {})
        out.append(
            {
                "run": str(info.path),
                "arm": info.arm,
                "seed": info.seed,
                "step": step,
                "hacks": sum(r[key] == "hack" for r in rows),
                "completions": len(rows),
                "gt_pass": sum(bool(r["gt_pass"]) for r in rows),
                "proj_cos_in": log.get("proj_cos_in"),
                "proj_cos_out": log.get("proj_cos_out"),
                "proj_frac_fired": log.get("proj_frac_fired"),
            }
        )
    return out


def replay_trajectory(info: RunInfo) -> list[dict[str, Any]]:
    """One row per step of a probe replay run: its mean cosines (`step_stats`)."""
    from persona_cli.probe.steps import step_stats
    from persona_cli.schemas import PROBE_STEP

    out = []
    for step, path in _step_files(info.path).items():
        s = step_stats(read_jsonl(path, PROBE_STEP.check))
        out.append(
            {
                "run": str(info.path),
                "arm": info.arm,
                "seed": info.seed,
                "step": step,
                "mean_cos": s["mean_cos"],
                "mean_cos_in": s["mean_cos_in"],
                "mean_cos_out": s["mean_cos_out"],
                "frac_fired": s["frac_fired"],
                "hack_rate": s["hack_rate"],
            }
        )
    return out


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def rl_summary(rows: list[dict[str, Any]], arms: list[str], job: ArmsJob) -> dict[str, Any]:
    from persona_cli.stats import proportion_interval, seed_comparison

    by = defaultdict(list)
    for r in rows:
        by[(r["arm"], r["step"])].append(r)
    steps = sorted({r["step"] for r in rows})
    trajectories: dict[str, list[dict[str, Any]]] = {}
    for arm in arms:
        traj = []
        for step in steps:
            rs = by.get((arm, step), [])
            if not rs:
                continue
            hacks, n = sum(r["hacks"] for r in rs), sum(r["completions"] for r in rs)
            est = proportion_interval(hacks, n, method="wilson", alpha=job.alpha)
            traj.append(
                {
                    "step": step,
                    "seeds": len(rs),
                    "hacks": hacks,
                    "completions": n,
                    "rate": est.rate,
                    "low": est.low,
                    "high": est.high,
                    "seed_rates": {
                        str(r["seed"]): (
                            r["hacks"] / r["completions"] if r["completions"] else None
                        )
                        for r in rs
                    },
                    "proj_cos_in": _mean([r["proj_cos_in"] for r in rs]),
                    "proj_cos_out": _mean([r["proj_cos_out"] for r in rs]),
                }
            )
        trajectories[arm] = traj
    runs_per_arm = {arm: {r["run"] for r in rows if r["arm"] == arm} for arm in arms}
    common = [
        s for s in steps if all(len(by.get((a, s), [])) == len(runs_per_arm[a]) for a in arms)
    ]
    chosen = list(job.steps) or common[-1:]
    missing = [s for s in chosen if s not in common]
    if missing:
        raise UserError(f"--steps {missing[0]}: not a step every run has (they share {common})")
    comparisons = []
    reference = arms[0]
    for step in chosen:
        for arm in arms[1:]:
            mine, ref = by[(arm, step)], by[(reference, step)]
            rates = [r["hacks"] / r["completions"] for r in mine if r["completions"]]
            ref_rates = [r["hacks"] / r["completions"] for r in ref if r["completions"]]
            counts = (sum(r["hacks"] for r in mine), sum(r["completions"] for r in mine))
            ref_counts = (sum(r["hacks"] for r in ref), sum(r["completions"] for r in ref))
            record = seed_comparison(rates, ref_rates, counts, ref_counts, config=job.comparison)
            comparisons.append(
                {
                    "step": step,
                    "arm": arm,
                    "reference": reference,
                    "rate": _mean(rates),
                    "reference_rate": _mean(ref_rates),
                    "diff": _mean(rates) - _mean(ref_rates) if rates and ref_rates else None,
                    **record,
                }
            )
    return {"steps": steps, "trajectories": trajectories, "comparisons": comparisons}


def replay_summary(rows: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    trajectories = {}
    for arm in arms:
        steps = sorted({r["step"] for r in rows if r["arm"] == arm})
        trajectories[arm] = [
            {
                "step": s,
                **{
                    k: _mean([r[k] for r in rows if r["arm"] == arm and r["step"] == s])
                    for k in ("mean_cos", "mean_cos_in", "mean_cos_out", "frac_fired")
                },
            }
            for s in steps
        ]
    return {"trajectories": trajectories, "comparisons": []}


def plot_png(summary: dict[str, Any], job: ArmsJob) -> bytes:
    """Hack rate per step with Wilson bands, and the update cosines per step, per arm (GRPO);
    the replay's mean cos_in / cos_out per step, per arm (probe replay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kind, traj = summary["kind"], summary["trajectories"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (arm, points) in enumerate(traj.items()):
        color = f"C{i}"
        x = [p["step"] for p in points]
        label = f"{job.arm_field}={arm}"
        if kind == "rl":
            left.plot(x, [p["rate"] for p in points], marker="o", color=color, label=label)
            left.fill_between(
                x, [p["low"] for p in points], [p["high"] for p in points], color=color, alpha=0.2
            )
            cos_in, cos_out = "proj_cos_in", "proj_cos_out"
        else:
            left.plot(x, [p["mean_cos"] for p in points], marker="o", color=color, label=label)
            cos_in, cos_out = "mean_cos_in", "mean_cos_out"
        for key, style in ((cos_in, "-"), (cos_out, "--")):
            ys = [p[key] for p in points]
            if any(y is not None for y in ys):
                right.plot(
                    x,
                    [float("nan") if y is None else y for y in ys],
                    style,
                    marker=".",
                    color=color,
                    label=f"{label} {key.split('_')[-1]}",
                )
    if kind == "rl":
        completions = "policy's own" if job.completions == "policy" else "all"
        left.set_ylabel(f"hack rate ({job.label}, {completions} completions)")
        left.set_title(f"hack rate per step, Wilson {100 * (1 - job.alpha):.0f}% band")
        right.set_title("update cosine with v_hack (in: before, out: after projection)")
    else:
        left.set_ylabel("mean cosine with v_hack")
        left.set_title("probe replay: mean per-sample cosine per step")
        right.set_title("mean cos_in / cos_out per step")
    right.axhline(0.0, color="grey", lw=0.5)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def compare_arms(job: ArmsJob, out: str | Path, *, force: bool = False) -> ArmsResult:
    job = job.check()
    infos, allowed = _runs(job)
    config = {**asdict(job), "runs": [str(i.path) for i in infos]}
    run = open_run(out, command=COMMAND, config=config, force=force)
    if run.done:
        return ArmsResult(run, read_json(run.file("summary.json")), already_done=True)
    arms = list(dict.fromkeys(i.arm for i in infos))
    kind = "replay" if infos[0].command == REPLAY else "rl"
    if kind == "rl":
        rows = [r for i in infos for r in rl_trajectory(i, job)]
        body = rl_summary(rows, arms, job)
    else:
        rows = [r for i in infos for r in replay_trajectory(i)]
        body = replay_summary(rows, arms)
    summary = {
        "schema_version": SUMMARY_VERSION,
        "kind": kind,
        "arm_field": job.arm_field,
        "arms": {arm: [str(i.path) for i in infos if i.arm == arm] for arm in arms},
        "seeds": {arm: [i.seed for i in infos if i.arm == arm] for arm in arms},
        "label": job.label if kind == "rl" else None,
        "completions": job.completions if kind == "rl" else None,
        "comparison": job.comparison.to_dict(),
        "allowed_differences": [d.to_dict() for d in allowed],
        **body,
    }
    write_jsonl(run.file("trajectories.jsonl.gz"), rows, schema_version=1)
    write_json(run.file("summary.json"), summary)
    write_bytes_atomic(run.file("arms.png"), plot_png(summary, job))
    run.finish(
        inputs={f"run[{k}]:manifest": i.path / MANIFEST for k, i in enumerate(infos)},
        protocol=method_protocol() | details(arm_field=job.arm_field, arms=arms),
        seeds=sorted({i.seed for i in infos if i.seed is not None}),
    )
    return ArmsResult(run, summary)
