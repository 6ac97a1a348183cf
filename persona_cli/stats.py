"""Statistics every experiment reports with: rates with intervals, tests, effect sizes, seeds.

Thin, typed wrappers over scipy and statsmodels (imported where a function runs, so the CLI
starts without them) so that every command computes a confidence
interval, p-value or multi-seed summary the same way and writes it in the same shape. Each result
is a frozen dataclass whose `to_dict()` is plain JSON (no NaN or infinity: an undefined quantity
is `None`), ready for `summary.json`.

Every p-value a summary writes is a record naming its test and alternative (`labelled()`):
`{"test": "welch"|"fisher"|"z", "alternative": "two-sided"|"less"|"greater", "p_value": ...,
"pooled": bool, ...}`. Seeds are the unit of replication: `seed_comparison` makes the Welch test
on per-seed values the headline wherever both sides have two or more seeds, and reports a count
test on completions pooled over seeds beside it, labelled as pooled; with fewer seeds the count
test is the only one and the record's `note` says so. `adjust_headlines` adds Holm and
Bonferroni p-values over a family of such comparisons.

    from persona_cli.stats import proportion_interval
    proportion_interval(37, 280).to_dict()  # Wilson 95% interval for a marker rate
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from persona_cli.comparison import (  # noqa: F401 (describe_test, format_p: re-exported)
    ADJUST_METHODS,
    ALTERNATIVES,
    COUNT_TESTS,
    ComparisonConfig,
    describe_test,
    format_p,
)

PROPORTION_METHODS = {"wilson": "wilson", "wald": "normal", "beta": "beta"}  # ours -> statsmodels
_SM_ALTERNATIVE = {"two-sided": "two-sided", "less": "smaller", "greater": "larger"}
FAMILY_METHODS = ("holm", "bonferroni")  # the corrections written beside every headline family
POOLED_ASSUMPTION = "treats completions as independent (counts pooled over seeds and prompts)"
MIN_EXPECTED_FOR_Z = 5.0  # the usual rule of thumb for the normal approximation to a 2x2 table


@dataclasses.dataclass(frozen=True)
class _Record:
    def to_dict(self) -> dict[str, Any]:
        # asdict keeps tuples as tuples; JSON writers and schema checks want lists.
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


@dataclasses.dataclass(frozen=True)
class _Test(_Record):
    def labelled(self, *, pooled: bool = False) -> dict[str, Any]:
        """The record a summary writes: test, alternative and p_value first, then the details.
        `pooled`: the counts were summed over seeds by the caller (the test then treats every
        completion as independent, which POOLED_ASSUMPTION states in the record)."""
        d = self.to_dict()
        out = {"test": d.pop("method"), "alternative": d.pop("alternative")}
        out["p_value"] = d.pop("p_value")
        out["pooled"] = pooled
        if pooled:
            out["assumption"] = POOLED_ASSUMPTION
        return {**out, **d}


@dataclasses.dataclass(frozen=True)
class ProportionEstimate(_Record):
    successes: int
    n: int
    rate: float | None  # None when n == 0: an empty cell is reported, not crashed on
    low: float | None
    high: float | None
    method: str  # "wilson", "wald" or "beta" (Clopper-Pearson)
    alpha: float  # the interval covers with probability 1 - alpha


@dataclasses.dataclass(frozen=True)
class ProportionComparison(_Test):
    successes1: int
    n1: int
    successes2: int
    n2: int
    rate1: float
    rate2: float
    diff: float  # rate1 - rate2
    z: float | None  # pooled z statistic; None when both rates are 0 or both are 1
    z_p_value: float | None
    fisher_p_value: float
    odds_ratio: float | None  # sample odds ratio; None when a zero cell makes it 0/0 or infinite
    min_expected: float  # smallest expected cell count under the pooled null
    method: str  # "z" or "fisher": which test `p_value` comes from
    p_value: float | None  # None only when the z-test was asked for and is undefined
    alternative: str


@dataclasses.dataclass(frozen=True)
class MeanEstimate(_Record):
    n: int
    mean: float
    std: float | None  # ddof=1; None when n == 1
    sem: float | None
    half_width: float | None  # t-based, t_{1-alpha/2, n-1} * sem
    low: float | None
    high: float | None
    alpha: float
    values: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class TestResult(_Test):
    __test__ = False  # not a pytest test class, despite the name

    statistic: float | None  # None when the test is undefined (both samples constant)
    df: float | None
    p_value: float | None
    alternative: str
    method: str


def _check_alpha(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_alternative(alternative: str) -> str:
    return _check_choice("alternative", alternative, ALTERNATIVES)


def _check_counts(successes: int, n: int) -> tuple[int, int]:
    # operator.index accepts ints and numpy integers but refuses 3.0 and "3".
    successes, n = operator.index(successes), operator.index(n)
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    return successes, n


def _sample(values: Sequence[float], name: str, min_n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers")
    if arr.size < min_n:
        raise ValueError(f"{name} needs at least {min_n} value(s), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def proportion_interval(
    successes: int, n: int, *, method: str = "wilson", alpha: float = 0.05
) -> ProportionEstimate:
    """Rate successes/n with a two-sided 1 - alpha interval (statsmodels `proportion_confint`).

    method: "wilson" (score interval; the default because it behaves at rates near 0 and 1),
    "wald" (normal approximation, clipped to [0, 1] as statsmodels does) or "beta"
    (Clopper-Pearson, exact and conservative). n == 0 gives rate/low/high None.
    """
    successes, n = _check_counts(successes, n)
    alpha = _check_alpha(alpha)
    if method not in PROPORTION_METHODS:
        raise ValueError(f"method must be one of {tuple(PROPORTION_METHODS)}, got {method!r}")
    if n == 0:
        return ProportionEstimate(successes, n, None, None, None, method, alpha)
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, n, alpha=alpha, method=PROPORTION_METHODS[method])
    # For every method the bound is exactly 0 at k == 0 and exactly 1 at k == n; pin those and
    # clip float noise elsewhere so a table never shows 0.9999999999999999 or leaves [0, 1].
    low = 0.0 if successes == 0 else min(max(float(low), 0.0), 1.0)
    high = 1.0 if successes == n else min(max(float(high), 0.0), 1.0)
    return ProportionEstimate(successes, n, successes / n, low, high, method, alpha)


def two_proportion_test(
    s1: int, n1: int, s2: int, n2: int, *, alternative: str = "two-sided", test: str = "auto"
) -> ProportionComparison:
    """Compare rate s1/n1 with s2/n2 by a pooled z-test and by Fisher's exact test.

    Both are always computed; `test` picks the one `p_value` reports. "auto": Fisher's exact test
    (`method="fisher"`) when any expected cell count of the 2x2 table [[s1, n1-s1], [s2, n2-s2]]
    under the pooled null, row_total * column_total / N, is below 5, otherwise the z-test
    (`method="z"`); both rates 0 or both 1 make every expected count in one column 0, so Fisher is
    used and z is None. "fisher" or "z": that test whatever the counts (a forced z-test that is
    undefined gives p_value None). alternative: "two-sided", "less" (rate1 < rate2) or "greater"
    (rate1 > rate2).
    """
    s1, n1 = _check_counts(s1, n1)
    s2, n2 = _check_counts(s2, n2)
    alternative = _check_alternative(alternative)
    test = _check_choice("test", test, COUNT_TESTS)
    if n1 == 0 or n2 == 0:
        raise ValueError(f"cannot compare an empty group (n1={n1}, n2={n2})")
    table = [[s1, n1 - s1], [s2, n2 - s2]]
    total, col_success = n1 + n2, s1 + s2
    min_expected = min(r * c / total for r in (n1, n2) for c in (col_success, total - col_success))

    z = z_p = None
    if 0 < col_success < total:  # pooled rate strictly inside (0, 1): the z standard error is > 0
        from statsmodels.stats.proportion import proportions_ztest

        z_stat, z_pval = proportions_ztest(
            [s1, s2], [n1, n2], alternative=_SM_ALTERNATIVE[alternative]
        )
        z, z_p = float(z_stat), float(z_pval)
    from scipy.stats import fisher_exact

    fisher = fisher_exact(table, alternative=alternative)
    fisher_p = min(float(fisher.pvalue), 1.0)  # summed tail probabilities can exceed 1 by ~1e-16

    if test == "auto":
        use_fisher = z_p is None or min_expected < MIN_EXPECTED_FOR_Z
    else:
        use_fisher = test == "fisher"
    return ProportionComparison(
        successes1=s1,
        n1=n1,
        successes2=s2,
        n2=n2,
        rate1=s1 / n1,
        rate2=s2 / n2,
        diff=s1 / n1 - s2 / n2,
        z=z,
        z_p_value=z_p,
        fisher_p_value=fisher_p,
        odds_ratio=_finite_or_none(fisher.statistic),
        min_expected=float(min_expected),
        method="fisher" if use_fisher else "z",
        p_value=fisher_p if use_fisher else z_p,
        alternative=alternative,
    )


def mean_interval(values: Sequence[float], *, alpha: float = 0.05) -> MeanEstimate:
    """Mean with a two-sided Student-t 1 - alpha interval: mean +- t_{1-alpha/2, n-1} * s / sqrt(n).

    std uses ddof=1. With n == 1 there is no spread estimate, so std, sem, half_width, low and high
    are None. n == 0 raises ValueError.
    """
    alpha = _check_alpha(alpha)
    arr = _sample(values, "values", 1)
    n, mean = int(arr.size), float(np.mean(arr))
    if n == 1:
        return MeanEstimate(n, mean, None, None, None, None, None, alpha, (float(arr[0]),))
    std = float(np.std(arr, ddof=1))
    sem = std / math.sqrt(n)
    from scipy.stats import t as student_t

    half = float(student_t.ppf(1.0 - alpha / 2.0, n - 1)) * sem
    return MeanEstimate(
        n, mean, std, sem, half, mean - half, mean + half, alpha, tuple(float(v) for v in arr)
    )


def welch_test(
    a: Sequence[float], b: Sequence[float], *, alternative: str = "two-sided"
) -> TestResult:
    """Welch's unequal-variance t-test (scipy `ttest_ind(equal_var=False)`).

    df is the Welch-Satterthwaite value. alternative: "two-sided", "less" (mean(a) < mean(b)) or
    "greater" (mean(a) > mean(b)). Each sample needs >= 2 values. When both samples are constant
    the standard error is 0 and the test is undefined: statistic, df and p_value are None.
    """
    alternative = _check_alternative(alternative)
    xa, xb = _sample(a, "a", 2), _sample(b, "b", 2)
    if np.ptp(xa) == 0 and np.ptp(xb) == 0:
        return TestResult(None, None, None, alternative, "welch")
    from scipy.stats import ttest_ind

    res = ttest_ind(xa, xb, equal_var=False, alternative=alternative)
    return TestResult(float(res.statistic), float(res.df), float(res.pvalue), alternative, "welch")


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Cohen's d = (mean(a) - mean(b)) / s_pooled; positive means a's mean is larger.

    s_pooled^2 = ((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2), each s^2 with ddof=1 (no
    Hedges small-sample correction). Each sample needs >= 2 values. Returns None when both samples
    are constant (s_pooled = 0), where the effect size is undefined rather than infinite.
    """
    xa, xb = _sample(a, "a", 2), _sample(b, "b", 2)
    na, nb = xa.size, xb.size
    pooled_var = ((na - 1) * np.var(xa, ddof=1) + (nb - 1) * np.var(xb, ddof=1)) / (na + nb - 2)
    if pooled_var == 0:
        return None
    return float((np.mean(xa) - np.mean(xb)) / math.sqrt(pooled_var))


def adjust_pvalues(p_values: Sequence[float], method: str) -> list[float]:
    """Family-wise corrected p-values in input order (statsmodels `multipletests`).

    method: "none" (returned unchanged), "bonferroni" (min(1, m p)) or "holm" (step-down). The
    family is every p-value passed; an undefined (None) p-value must be dropped by the caller,
    which changes m, so it is refused here rather than silently skipped.
    """
    _check_choice("method", method, ADJUST_METHODS)
    if any(p is None for p in p_values):
        raise ValueError("p_values contains None; decide the family explicitly before adjusting")
    arr = _sample(p_values, "p_values", 0)
    if np.any((arr < 0) | (arr > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    if method == "none" or arr.size == 0:
        return [float(p) for p in arr]
    from statsmodels.stats.multitest import multipletests

    _, corrected, _, _ = multipletests(arr, method=method)
    return [float(p) for p in corrected]


def adjust_family(p_values: Sequence[float | None], method: str) -> list[float | None]:
    """`adjust_pvalues` over the defined p-values only: the family is every p-value that is not
    None (an undefined test makes no claim, so it does not count towards m); None stays None."""
    defined = [p for p in p_values if p is not None]
    adjusted = iter(adjust_pvalues(defined, method))
    return [None if p is None else next(adjusted) for p in p_values]


def seed_comparison(
    values1: Sequence[float],
    values2: Sequence[float],
    counts1: tuple[int, int] | None = None,
    counts2: tuple[int, int] | None = None,
    *,
    config: ComparisonConfig,
) -> dict[str, Any]:
    """Arm 1 against arm 2 with seeds as the unit of replication.

    values1/values2: one value per seed (e.g. each seed's marker rate). counts1/counts2: (hits,
    completions) summed over each arm's seeds, or None when the metric is not a proportion.
    Returns `headline` (the test a reader should quote), `pooled` (the count test on pooled
    completions when it is not the headline, else None) and `note` (why the headline is what it
    is, or None). With two or more seeds on both sides the headline is `welch_test` on the
    per-seed values (`unit: "seed"`); otherwise it is the count test (`unit: "completion"`), or
    None when there are no counts either. Count tests carry `pooled: true` and the assumption.
    """
    n1, n2 = len(values1), len(values2)
    count = None
    if counts1 is not None and counts2 is not None:
        count = two_proportion_test(
            *counts1, *counts2, alternative=config.alternative, test=config.test
        ).labelled(pooled=True)
        count["unit"] = "completion"
    out: dict[str, Any] = {"n_seeds1": n1, "n_seeds2": n2}
    if n1 >= 2 and n2 >= 2:
        welch = welch_test(values1, values2, alternative=config.alternative).labelled()
        welch["unit"] = "seed"
        welch["diff"] = float(np.mean(values1) - np.mean(values2))
        note = None
        if welch["p_value"] is None:
            note = "Welch test undefined: the per-seed values are constant in both arms"
        return {**out, "headline": welch, "pooled": count, "note": note}
    few = f"fewer than two seeds in an arm ({n1} vs {n2})"
    if count is None:
        return {**out, "headline": None, "pooled": None, "note": f"{few}: no test"}
    note = f"{few}: the count test on completions is the only test; it {POOLED_ASSUMPTION}"
    return {**out, "headline": count, "pooled": None, "note": note}


def adjust_headlines(comparisons: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Set `p_holm` and `p_bonferroni` on every `seed_comparison` record: its headline p-value
    adjusted over the family of all defined headline p-values (None where undefined). Returns
    the description of the family that a summary writes beside the records."""
    raw = [c["headline"]["p_value"] if c["headline"] else None for c in comparisons]
    for method in FAMILY_METHODS:
        for c, p in zip(comparisons, adjust_family(raw, method), strict=True):
            c[f"p_{method}"] = p
    return {
        "adjusts": "headline.p_value",
        "methods": list(FAMILY_METHODS),
        "m": sum(p is not None for p in raw),
    }


def summarize_seeds(values_by_seed: Mapping[int, float], alpha: float = 0.05) -> dict[str, Any]:
    """Standard multi-seed summary: the `mean_interval` of one metric over seeds, as plain JSON.

    Keys: n_seeds, seeds (ascending), values (aligned with seeds), mean, std, sem, half_width
    (t-based, confidence 1 - alpha), low, high, alpha. With one seed the spread fields are None.
    """
    if not values_by_seed:
        raise ValueError("values_by_seed is empty")
    seeds = sorted(operator.index(s) for s in values_by_seed)
    est = mean_interval([values_by_seed[s] for s in seeds], alpha=alpha)
    return {
        "n_seeds": est.n,
        "seeds": seeds,
        "values": list(est.values),
        "mean": est.mean,
        "std": est.std,
        "sem": est.sem,
        "half_width": est.half_width,
        "low": est.low,
        "high": est.high,
        "alpha": est.alpha,
    }
