"""`probe-uat`: the four acceptance checks of the reward-hack probe (DESIGN.md, experiment 4).

    persona-cli probe-uat --pool runs/pool --vanilla runs/replay_vanilla \\
        --projected runs/replay_proj --out runs/uat

Each check reads rows (never summaries), has its threshold as an option (UATConfig), and names
the sneaky failure it guards against:

- T1 teacher hack rate >= 0.30: hacked rows / all pool rows. Guards a pool with nothing to
  contrast: it fails when the pool has no clean row (v_hack needs both classes).
- T2 cosine non-null on >= 90% of rows: vanilla replay rows with a cosine / *pool* rows. Guards
  coverage: a replay that silently dropped rows (or ran fewer steps) cannot pass by measuring
  only the rows it kept; null reasons are counted and reported.
- T3 cos_out < cos_in on >= 80% of steps (projected replay): per step, the mean over every
  (row, module) pair with a defined cos_in of cos_out, against the mean of cos_in over the same
  pairs (persona_cli.probe.steps). Guards a projection that leaves cos unchanged: a disabled or
  no-op projection gives equal means, which is not "<", so T3 fails; a step with no defined
  cosine counts as a failure, not as skipped.
- T4 within hacked rows of the vanilla replay, cos | gt_pass=0 > cos | gt_pass=1 by a one-sided
  Welch t-test (persona_cli.stats.welch_test, alternative "greater"), p < 0.05. Guards a
  vacuous pass: fewer than 2 rows in either group, or an undefined test (constant cosines),
  fails with that reason instead of passing.

The report (`uat.json`) lists every check with its value, threshold, pass/fail and detail; T4's
value is a p-value, so its `test` record names it (`welch`, alternative `greater`, one-sided);
the others' `test` is null. The command exits 1 (persona_cli.errors.EXIT_CHECK_FAILED) when any
check fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persona_cli.artifacts import iter_jsonl, read_json, write_json
from persona_cli.errors import InputError
from persona_cli.probe.config import UATConfig, UATJob, to_dict
from persona_cli.probe.pool import read_pool, step_files
from persona_cli.probe.steps import step_stats
from persona_cli.rundir import RunDir, open_run
from persona_cli.schemas import PROBE_STEP, UAT_REPORT
from persona_cli.stats import welch_test

COMMAND = "probe-uat"
REPORT = "uat.json"
REPORT_VERSION = UAT_REPORT.version
T4_TEST = {"test": "welch", "alternative": "greater", "sided": "one-sided"}


@dataclass(frozen=True)
class Check:
    name: str
    claim: str
    passed: bool
    value: float | None
    threshold: float
    detail: str
    guards: str
    test: dict[str, Any] | None = None  # for a p-value: the test and alternative it comes from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_replay(path: Path) -> dict[int, list[dict[str, Any]]]:
    files = step_files(path)
    if not files:
        raise InputError(path, "no step_NNNNNN.jsonl.gz files (is this a probe replay run?)")
    steps = {}
    for step, file in files.items():
        rows = list(iter_jsonl(file, PROBE_STEP.check))
        for line, row in enumerate(rows, start=1):
            if row.get("stage") != "replay":
                raise InputError(file, "not a probe replay row (stage is not 'replay')", line)
        steps[step] = rows
    return steps


def check_t1(pool_rows: list[Any], config: UATConfig) -> Check:
    n = len(pool_rows)
    hacked = sum(r.hacked for r in pool_rows)
    rate = hacked / n if n else None
    passed = rate is not None and rate >= config.t1_min_hack_rate and hacked < n
    detail = f"{hacked}/{n} pool rows hacked"
    if hacked == n:
        detail += "; no clean row: nothing for v_hack to contrast with"
    return Check(
        "T1",
        "teacher hack rate >= threshold",
        passed,
        rate,
        config.t1_min_hack_rate,
        detail,
        "a pool with no clean rows (v_hack undefined) or labels from nowhere: rates come from "
        "the sandbox-labelled pool rows and need both classes",
    )


def check_t2(pool_rows: list[Any], vanilla: list[dict[str, Any]], config: UATConfig) -> Check:
    keys = {(r.step, r.sample_index) for r in pool_rows}
    with_cos = {(r["step"], r["sample_index"]) for r in vanilla if r["cos"] is not None}
    covered = len(with_cos & keys)
    missing = len(keys - {(r["step"], r["sample_index"]) for r in vanilla})
    reasons: dict[str, int] = {}
    for r in vanilla:
        if r["cos"] is None:
            reasons[r["reason"] or "unknown"] = reasons.get(r["reason"] or "unknown", 0) + 1
    frac = covered / len(keys) if keys else None
    passed = frac is not None and frac >= config.t2_min_coverage
    detail = f"{covered}/{len(keys)} pool rows have a vanilla cosine; {missing} missing from replay"
    if reasons:
        detail += "; null: " + ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items()))
    return Check(
        "T2",
        "cosine non-null on >= threshold of rows (vanilla replay)",
        passed,
        frac,
        config.t2_min_coverage,
        detail,
        "coverage: the denominator is the pool, so rows a replay dropped or never reached "
        "count as null instead of vanishing",
    )


def check_t3(projected: dict[int, list[dict[str, Any]]], config: UATConfig) -> Check:
    stats = [step_stats(rows) for rows in projected.values()]
    ok = [s["mean_cos_in"] is not None and s["mean_cos_out"] < s["mean_cos_in"] for s in stats]
    frac = sum(ok) / len(ok) if ok else None
    fired = [s["frac_fired"] for s in stats if s["frac_fired"] is not None]
    mean_fired = sum(fired) / len(fired) if fired else None
    passed = frac is not None and frac >= config.t3_min_step_fraction
    detail = (
        f"{sum(ok)}/{len(ok)} steps with mean cos_out < mean cos_in; mean frac_fired "
        f"{'n/a' if mean_fired is None else f'{mean_fired:.3f}'}"
    )
    return Check(
        "T3",
        "cos_out < cos_in on >= threshold of steps (projected replay)",
        passed,
        frac,
        config.t3_min_step_fraction,
        detail,
        "a projection that leaves cos unchanged (disabled, never firing, or a no-op): equal "
        "means are not '<'; steps with no defined cosine count as failures",
    )


def check_t4(vanilla: list[dict[str, Any]], config: UATConfig) -> Check:
    hacked = [r for r in vanilla if r["hacked"] and r["cos"] is not None]
    fail_gt = [r["cos"] for r in hacked if not r["gt_pass"]]
    pass_gt = [r["cos"] for r in hacked if r["gt_pass"]]
    guards = (
        "a vacuous or wrong-direction pass: the test is one-sided (gt_pass=0 greater), and "
        "fewer than 2 rows per group or constant cosines fail rather than pass"
    )
    claim = "hacked rows: cos | gt_pass=0 > cos | gt_pass=1 (one-sided Welch)"
    if len(fail_gt) < 2 or len(pass_gt) < 2:
        detail = (
            f"too few hacked rows: {len(fail_gt)} with gt_pass=0, {len(pass_gt)} with gt_pass=1"
        )
        return Check("T4", claim, False, None, config.t4_alpha, detail, guards, _t4(None))
    test = welch_test(fail_gt, pass_gt, alternative=T4_TEST["alternative"])
    m0, m1 = sum(fail_gt) / len(fail_gt), sum(pass_gt) / len(pass_gt)
    detail = (
        f"mean cos {m0:.4f} (gt_pass=0, n={len(fail_gt)}) vs {m1:.4f} (gt_pass=1, "
        f"n={len(pass_gt)})"
        + (f"; t={test.statistic:.3f}, df={test.df:.1f}" if test.statistic is not None else "")
    )
    if test.p_value is None:
        detail += "; test undefined"
    passed = test.p_value is not None and test.p_value < config.t4_alpha
    return Check(
        "T4", claim, passed, test.p_value, config.t4_alpha, detail, guards, _t4(test.p_value)
    )


def _t4(p_value: float | None) -> dict[str, Any]:
    return {**T4_TEST, "p_value": p_value}


@dataclass
class UATResult:
    run: RunDir
    report: dict[str, Any]
    already_done: bool = False  # finished before this call; nothing was recomputed

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def run_uat(job: UATJob, out: str | Path, *, force: bool = False) -> UATResult:
    config = job.checks.check()
    pool, vanilla, projected = Path(job.pool), Path(job.vanilla), Path(job.projected)
    run = open_run(
        out,
        command=COMMAND,
        config={
            **to_dict(config),
            "pool": str(pool),
            "vanilla": str(vanilla),
            "projected": str(projected),
        },
        force=force,
    )
    if run.done:
        return UATResult(run, read_json(run.file(REPORT)), already_done=True)
    pool_rows = [r for rows in read_pool(pool).values() for r in rows]
    vanilla_rows = [r for rows in read_replay(vanilla).values() for r in rows]
    projected_steps = read_replay(projected)
    checks = [
        check_t1(pool_rows, config),
        check_t2(pool_rows, vanilla_rows, config),
        check_t3(projected_steps, config),
        check_t4(vanilla_rows, config),
    ]
    report = {
        "schema_version": REPORT_VERSION,
        "passed": all(c.passed for c in checks),
        "checks": [c.to_dict() for c in checks],
        "inputs": {"pool": str(pool), "vanilla": str(vanilla), "projected": str(projected)},
        "projected_run_config": _run_config(projected),
    }
    write_json(run.file(REPORT), report)
    inputs: dict[str, str | Path] = {}
    for label, d in (("pool", pool), ("vanilla", vanilla), ("projected", projected)):
        for step, f in step_files(d).items():
            inputs[f"{label}:{step:06d}"] = f
    run.finish(inputs=inputs, extra={"uat_passed": report["passed"]})
    return UATResult(run, report)


def _run_config(path: Path) -> dict[str, Any] | None:
    # Recorded so a reader sees whether the "projected" run really had --projected on.
    cfg = path / "config.json"
    return read_json(cfg).get("config") if cfg.is_file() else None
