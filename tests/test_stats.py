"""Tests for persona_cli.stats against independent references.

References are closed-form formulas written out here with plain loops and `math`, exact
hypergeometric and binomial sums with `math.comb`, hand-computed cases, published values
(Newcombe 1998, Fisher's tea-tasting table), scipy-vs-statsmodels cross-checks, and scipy's or
statsmodels' own result where a test checks which test a record names.
Run: python -m pytest tests/test_stats.py -q
"""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import DescrStatsW
from statsmodels.stats.weightstats import ttest_ind as sm_ttest_ind

from persona_cli.errors import UserError
from persona_cli.stats import (
    ComparisonConfig,
    adjust_family,
    adjust_headlines,
    adjust_pvalues,
    cohens_d,
    describe_test,
    mean_interval,
    proportion_interval,
    seed_comparison,
    summarize_seeds,
    two_proportion_test,
    welch_test,
)

TOL = 1e-9
approx = lambda x: pytest.approx(x, abs=TOL, rel=TOL)  # noqa: E731


def z_quantile(alpha: float) -> float:
    # stdlib normal quantile: independent of scipy, which statsmodels uses internally.
    return NormalDist().inv_cdf(1 - alpha / 2)


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def mean_(xs: list[float]) -> float:
    total = 0.0
    for x in xs:
        total += x
    return total / len(xs)


def var_(xs: list[float]) -> float:
    m = mean_(xs)
    ss = 0.0
    for x in xs:
        ss += (x - m) ** 2
    return ss / (len(xs) - 1)


def assert_json_clean(record) -> None:
    d = record if isinstance(record, dict) else record.to_dict()
    json.dumps(d, allow_nan=False)  # raises on NaN or infinity


# ---------------------------------------------------------------- proportion_interval


def wilson_ref(k: int, n: int, alpha: float) -> tuple[float, float]:
    z = z_quantile(alpha)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def wald_ref(k: int, n: int, alpha: float) -> tuple[float, float]:
    p = k / n
    half = z_quantile(alpha) * math.sqrt(p * (1 - p) / n)
    return max(0.0, p - half), min(1.0, p + half)


def binom_tail_ge(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def binom_tail_le(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))


CASES = [(0, 10), (1, 3), (3, 10), (10, 10), (37, 280), (81, 263), (279, 280), (1, 1)]


@pytest.mark.parametrize("k,n", CASES)
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.01])
def test_wilson_and_wald_match_closed_form(k, n, alpha):
    w = proportion_interval(k, n, method="wilson", alpha=alpha)
    assert (w.low, w.high) == (
        approx(wilson_ref(k, n, alpha)[0]),
        approx(wilson_ref(k, n, alpha)[1]),
    )
    assert w.rate == approx(k / n)
    wd = proportion_interval(k, n, method="wald", alpha=alpha)
    lo, hi = wald_ref(k, n, alpha)
    assert (wd.low, wd.high) == (approx(lo), approx(hi))
    assert wd.method == "wald" and wd.alpha == alpha


@pytest.mark.parametrize("k,n", CASES)
def test_clopper_pearson_bounds_solve_binomial_tails(k, n):
    # The exact interval's bounds are where the binomial tail through k equals alpha/2.
    ci = proportion_interval(k, n, method="beta", alpha=0.05)
    if k == 0:
        assert ci.low == 0.0
    else:
        assert binom_tail_ge(k, n, ci.low) == approx(0.025)
    if k == n:
        assert ci.high == 1.0
    else:
        assert binom_tail_le(k, n, ci.high) == approx(0.025)


def test_published_newcombe_1998_intervals():
    # Newcombe (1998) Stat Med 17:857, Table I, to the 4 decimals printed there.
    pub = {
        (81, 263): {"wald": (0.2522, 0.3638), "wilson": (0.2553, 0.3662), "beta": (0.2527, 0.3676)},
        (15, 148): {"wald": (0.0527, 0.1500), "wilson": (0.0624, 0.1605)},
        (0, 20): {"wald": (0.0, 0.0), "wilson": (0.0, 0.1611)},
    }
    for (k, n), by_method in pub.items():
        for method, (lo, hi) in by_method.items():
            ci = proportion_interval(k, n, method=method)
            assert ci.low == pytest.approx(lo, abs=5e-5), (k, n, method)
            assert ci.high == pytest.approx(hi, abs=5e-5), (k, n, method)


def test_proportion_edge_cases():
    empty = proportion_interval(0, 0)
    assert (empty.rate, empty.low, empty.high) == (None, None, None)
    assert empty.to_dict()["rate"] is None
    assert_json_clean(empty)
    for method in ("wilson", "wald", "beta"):
        full = proportion_interval(20, 20, method=method)
        assert full.rate == 1.0 and full.high == 1.0  # exact, not 0.9999999999999999
        none = proportion_interval(0, 20, method=method)
        assert none.rate == 0.0 and none.low == 0.0
    assert proportion_interval(20, 20).low == approx(wilson_ref(20, 20, 0.05)[0])
    assert proportion_interval(np.int64(3), np.int64(7)).n == 7
    for bad in [(-1, 5), (6, 5), (1, -1)]:
        with pytest.raises(ValueError):
            proportion_interval(*bad)
    with pytest.raises(TypeError):
        proportion_interval(1.5, 4)
    with pytest.raises(ValueError):
        proportion_interval(1, 4, method="agresti")
    with pytest.raises(ValueError):
        proportion_interval(1, 4, alpha=1.0)


def test_results_are_frozen():
    ci = proportion_interval(1, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ci.rate = 0.5


# ---------------------------------------------------------------- two_proportion_test


def fisher_ref(s1: int, n1: int, s2: int, n2: int, alternative: str) -> float:
    """Exact conditional p-value: hypergeometric over tables with the observed margins."""
    total, col = n1 + n2, s1 + s2

    def pmf(x: int) -> Fraction:
        return Fraction(math.comb(n1, x) * math.comb(n2, col - x), math.comb(total, col))

    support = range(max(0, col - n2), min(n1, col) + 1)
    if alternative == "less":
        return float(sum(pmf(x) for x in support if x <= s1))
    if alternative == "greater":
        return float(sum(pmf(x) for x in support if x >= s1))
    p_obs = pmf(s1)
    return float(sum(pmf(x) for x in support if pmf(x) <= p_obs))


def z_ref(s1: int, n1: int, s2: int, n2: int) -> float:
    pooled = (s1 + s2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (s1 / n1 - s2 / n2) / se


def min_expected_ref(s1: int, n1: int, s2: int, n2: int) -> float:
    total = n1 + n2
    cols = [s1 + s2, total - s1 - s2]
    return min(row * col / total for row in (n1, n2) for col in cols)


def test_z_textbook_hand_case():
    # 45/100 vs 30/100: pooled 0.375, se^2 = 0.375 * 0.625 * 0.02 = 0.0046875, z^2 = 0.0225/se^2.
    r = two_proportion_test(45, 100, 30, 100)
    assert r.z == approx(math.sqrt(4.8))
    assert r.diff == approx(0.15)
    assert r.z_p_value == approx(math.erfc(math.sqrt(4.8) / math.sqrt(2)))
    assert r.method == "z" and r.p_value == r.z_p_value


@pytest.mark.parametrize(
    "s1,n1,s2,n2", [(45, 100, 30, 100), (37, 280, 12, 280), (120, 200, 95, 210), (7, 40, 15, 35)]
)
def test_z_matches_formula_and_scipy_chi2(s1, n1, s2, n2):
    z = z_ref(s1, n1, s2, n2)
    two = two_proportion_test(s1, n1, s2, n2)
    assert two.z == approx(z)
    assert two.z_p_value == approx(2 * (1 - normal_cdf(abs(z))))
    # Cross-check statsmodels against scipy: the uncorrected chi-square on the 2x2 table is z^2.
    chi2 = sps.chi2_contingency([[s1, n1 - s1], [s2, n2 - s2]], correction=False)
    assert two.z**2 == approx(chi2.statistic)
    assert two.z_p_value == approx(chi2.pvalue)
    assert two_proportion_test(s1, n1, s2, n2, alternative="greater").z_p_value == approx(
        1 - normal_cdf(z)
    )
    assert two_proportion_test(s1, n1, s2, n2, alternative="less").z_p_value == approx(
        normal_cdf(z)
    )


@pytest.mark.parametrize(
    "s1,n1,s2,n2", [(3, 4, 1, 4), (2, 10, 9, 12), (0, 15, 4, 15), (37, 280, 12, 280), (5, 5, 0, 6)]
)
@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_fisher_matches_hypergeometric_sum(s1, n1, s2, n2, alternative):
    r = two_proportion_test(s1, n1, s2, n2, alternative=alternative)
    assert r.fisher_p_value == approx(fisher_ref(s1, n1, s2, n2, alternative))
    assert r.min_expected == approx(min_expected_ref(s1, n1, s2, n2))
    f1, f2 = n1 - s1, n2 - s2
    if f1 * s2 > 0:
        assert r.odds_ratio == approx(s1 * f2 / (f1 * s2))
    elif s1 * f2 > 0:
        assert r.odds_ratio is None  # infinite
    assert_json_clean(r)


def test_fisher_tea_tasting():
    # Fisher's lady tasting tea: 3 of 4 cups right; P(X=3)=16/70, P(X=4)=1/70.
    r = two_proportion_test(3, 4, 1, 4)
    assert r.fisher_p_value == approx(34 / 70)
    assert two_proportion_test(3, 4, 1, 4, alternative="greater").fisher_p_value == approx(17 / 70)
    assert r.odds_ratio == approx(9.0)
    assert r.method == "fisher" and r.p_value == r.fisher_p_value  # expected counts are 2


def test_method_rule_boundary():
    # Expected counts exactly 5 keep the z-test; 4.5 switches to Fisher.
    at5 = two_proportion_test(5, 10, 5, 10)
    assert at5.min_expected == approx(5.0) and at5.method == "z"
    below = two_proportion_test(4, 10, 5, 10)
    assert below.min_expected == approx(4.5) and below.method == "fisher"
    assert below.p_value == below.fisher_p_value and below.z is not None


@pytest.mark.parametrize("s", [0, "all"])
def test_degenerate_equal_rates(s):
    n1, n2 = 30, 40
    s1, s2 = (0, 0) if s == 0 else (n1, n2)
    r = two_proportion_test(s1, n1, s2, n2)
    assert r.z is None and r.z_p_value is None
    assert r.method == "fisher" and r.p_value == 1.0 and r.diff == 0.0
    assert r.odds_ratio is None
    assert_json_clean(r)


def test_two_proportion_validation():
    with pytest.raises(ValueError):
        two_proportion_test(0, 0, 1, 5)
    with pytest.raises(ValueError):
        two_proportion_test(6, 5, 1, 5)
    with pytest.raises(ValueError):
        two_proportion_test(1, 5, 1, 5, alternative="smaller")


# ---------------------------------------------------------------- mean_interval


def test_mean_interval_hand_case():
    est = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert est.mean == 3.0
    assert est.std == approx(math.sqrt(2.5))
    assert est.sem == approx(math.sqrt(0.5))
    # t_{0.975, 4} = 2.776445105... (printed as 2.776 in every t table).
    assert est.half_width / math.sqrt(0.5) == pytest.approx(2.776, abs=5e-4)
    assert est.values == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert est.to_dict()["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("alpha", [0.05, 0.1])
@pytest.mark.parametrize("n", [2, 3, 10, 57])
def test_mean_interval_matches_formula_and_statsmodels(n, alpha):
    xs = [float(v) for v in np.random.default_rng(n).normal(0.4, 0.2, size=n)]
    est = mean_interval(xs, alpha=alpha)
    m, s = mean_(xs), math.sqrt(var_(xs))
    half = float(sps.t.ppf(1 - alpha / 2, n - 1)) * s / math.sqrt(n)
    assert est.mean == approx(m) and est.std == approx(s) and est.sem == approx(s / math.sqrt(n))
    assert (est.half_width, est.low, est.high) == (approx(half), approx(m - half), approx(m + half))
    lo, hi = DescrStatsW(np.array(xs)).tconfint_mean(alpha=alpha)
    assert (est.low, est.high) == (approx(lo), approx(hi))


def test_mean_interval_edges():
    one = mean_interval([0.7])
    assert one.n == 1 and one.mean == 0.7
    assert (one.std, one.sem, one.half_width, one.low, one.high) == (None,) * 5
    assert_json_clean(one)
    same = mean_interval([0.25, 0.25, 0.25])
    assert same.std == 0.0 and same.half_width == 0.0 and same.low == same.high == 0.25
    with pytest.raises(ValueError):
        mean_interval([])
    with pytest.raises(ValueError):
        mean_interval([1.0, float("nan")])


# ---------------------------------------------------------------- welch_test


def welch_ref(a: list[float], b: list[float]) -> tuple[float, float]:
    va, vb = var_(a) / len(a), var_(b) / len(b)
    t = (mean_(a) - mean_(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df


def test_welch_hand_case():
    # a: mean 2, var 1; b: mean 16/3, var 37/3 -> se^2 = 40/9, t = -sqrt(5/2), df = 1600/689.
    r = welch_test([1.0, 2.0, 3.0], [2.0, 5.0, 9.0])
    assert r.statistic == approx(-math.sqrt(2.5))
    assert r.df == approx(1600 / 689)
    assert r.method == "welch" and r.alternative == "two-sided"


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
@pytest.mark.parametrize("na,nb", [(5, 5), (8, 20), (3, 11)])
def test_welch_matches_formula_and_statsmodels(na, nb, alternative):
    rng = np.random.default_rng(na * 100 + nb)
    a = [float(v) for v in rng.normal(0.3, 0.1, size=na)]
    b = [float(v) for v in rng.normal(0.2, 0.3, size=nb)]
    r = welch_test(a, b, alternative=alternative)
    t, df = welch_ref(a, b)
    assert r.statistic == approx(t) and r.df == approx(df)
    tail = {"two-sided": 2 * sps.t.sf(abs(t), df), "greater": sps.t.sf(t, df)}
    tail["less"] = sps.t.cdf(t, df)
    assert r.p_value == approx(tail[alternative])
    sm_alt = {"two-sided": "two-sided", "less": "smaller", "greater": "larger"}[alternative]
    sm_t, sm_p, sm_df = sm_ttest_ind(a, b, alternative=sm_alt, usevar="unequal")
    assert (r.statistic, r.p_value, r.df) == (approx(sm_t), approx(sm_p), approx(sm_df))


def test_welch_edges():
    same = welch_test([0.1, 0.5, 0.9], [0.1, 0.5, 0.9])
    assert same.statistic == 0.0 and same.p_value == approx(1.0)
    const = welch_test([0.5, 0.5], [0.5, 0.5, 0.5])
    assert (const.statistic, const.df, const.p_value) == (None, None, None)
    assert_json_clean(const)
    with pytest.raises(ValueError):
        welch_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        welch_test([1.0, 2.0], [1.0, 2.0], alternative="larger")


# ---------------------------------------------------------------- cohens_d


def cohens_d_ref(a: list[float], b: list[float]) -> float:
    na, nb = len(a), len(b)
    pooled = ((na - 1) * var_(a) + (nb - 1) * var_(b)) / (na + nb - 2)
    return (mean_(a) - mean_(b)) / math.sqrt(pooled)


def test_cohens_d_hand_case_and_sign():
    # means 4 and 2, variances 4 and 1 -> pooled (2*4 + 2*1)/4 = 2.5.
    assert cohens_d([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == approx(2 / math.sqrt(2.5))
    assert cohens_d([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == approx(-2 / math.sqrt(2.5))


@pytest.mark.parametrize("na,nb", [(2, 2), (10, 10), (4, 17)])
def test_cohens_d_matches_formula(na, nb):
    rng = np.random.default_rng(na + 7 * nb)
    a = [float(v) for v in rng.normal(1.0, 0.5, size=na)]
    b = [float(v) for v in rng.normal(0.6, 1.5, size=nb)]
    assert cohens_d(a, b) == approx(cohens_d_ref(a, b))


def test_cohens_d_edges():
    assert cohens_d([0.3, 0.3], [0.3, 0.3, 0.3]) is None
    assert cohens_d([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]) == 0.0
    assert cohens_d([1.0, 1.0], [0.0, 2.0]) == approx(0.0)  # one constant sample is fine
    with pytest.raises(ValueError):
        cohens_d([1.0], [1.0, 2.0])


# ---------------------------------------------------------------- adjust_pvalues


def holm_ref(ps: list[float]) -> list[float]:
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def test_adjust_hand_case():
    ps = [0.01, 0.04, 0.03, 0.005]
    holm = adjust_pvalues(ps, "holm")
    assert holm == [approx(0.03), approx(0.06), approx(0.06), approx(0.02)]
    bonf = adjust_pvalues(ps, "bonferroni")
    assert bonf == [approx(0.04), approx(0.16), approx(0.12), approx(0.02)]
    assert adjust_pvalues([0.3, 0.6], "bonferroni") == [approx(0.6), approx(1.0)]
    assert adjust_pvalues(ps, "none") == ps


@pytest.mark.parametrize("seed", range(5))
def test_holm_and_bonferroni_match_loop(seed):
    rng = np.random.default_rng(seed)
    ps = [float(p) for p in rng.uniform(0, 0.2, size=12)] + [0.05, 0.05, 0.0, 1.0]  # ties, ends
    assert adjust_pvalues(ps, "holm") == [approx(p) for p in holm_ref(ps)]
    expected_bonf = [min(1.0, len(ps) * p) for p in ps]
    assert adjust_pvalues(ps, "bonferroni") == [approx(p) for p in expected_bonf]


def test_adjust_validation():
    assert adjust_pvalues([], "holm") == []
    for bad in ([0.1, 1.5], [-0.1], [0.1, None], [float("nan")]):
        with pytest.raises(ValueError):
            adjust_pvalues(bad, "holm")
    with pytest.raises(ValueError):
        adjust_pvalues([0.1], "fdr_bh")


# ---------------------------------------------------------------- summarize_seeds


def test_summarize_seeds_sorted_and_consistent():
    summary = summarize_seeds({256: 0.3, 42: 0.1, 137: 0.2})
    assert summary["seeds"] == [42, 137, 256]
    assert summary["values"] == [0.1, 0.2, 0.3]
    assert summary["n_seeds"] == 3
    assert summary["mean"] == approx(0.2) and summary["std"] == approx(0.1)
    half = float(sps.t.ppf(0.975, 2)) * 0.1 / math.sqrt(3)
    assert summary["half_width"] == approx(half)
    assert (summary["low"], summary["high"]) == (approx(0.2 - half), approx(0.2 + half))
    est = mean_interval([0.1, 0.2, 0.3])
    for key in ("mean", "std", "sem", "half_width", "low", "high", "alpha"):
        assert summary[key] == getattr(est, key)
    assert_json_clean(summary)


def test_summarize_seeds_edges():
    one = summarize_seeds({42: 0.5})
    assert one["n_seeds"] == 1 and one["mean"] == 0.5 and one["half_width"] is None
    assert_json_clean(one)
    assert summarize_seeds({1: 0.0, 2: 1.0}, alpha=0.1)["alpha"] == 0.1
    with pytest.raises(ValueError):
        summarize_seeds({})


# ---------------------------------------------------------------- named tests, seeds as the unit


@pytest.mark.parametrize("s1,n1,s2,n2", [(45, 100, 30, 100), (0, 280, 1, 280), (3, 4, 1, 4)])
@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_forced_count_test_reports_that_test(s1, n1, s2, n2, alternative):
    fisher = two_proportion_test(s1, n1, s2, n2, alternative=alternative, test="fisher")
    ref_fisher = sps.fisher_exact([[s1, n1 - s1], [s2, n2 - s2]], alternative=alternative)
    assert fisher.method == "fisher" and fisher.p_value == approx(min(ref_fisher.pvalue, 1.0))
    z = two_proportion_test(s1, n1, s2, n2, alternative=alternative, test="z")
    zr = z_ref(s1, n1, s2, n2)
    ref_z = {
        "two-sided": 2 * (1 - normal_cdf(abs(zr))),
        "less": normal_cdf(zr),
        "greater": 1 - normal_cdf(zr),
    }[alternative]
    assert z.method == "z" and z.p_value == approx(ref_z)
    record = z.labelled()
    assert list(record)[:4] == ["test", "alternative", "p_value", "pooled"]
    assert (record["test"], record["alternative"], record["pooled"]) == ("z", alternative, False)
    assert "method" not in record and record["fisher_p_value"] == fisher.p_value


def test_forced_z_on_a_degenerate_table_is_undefined_not_fisher():
    r = two_proportion_test(0, 30, 0, 40, test="z")
    assert r.method == "z" and r.p_value is None and r.fisher_p_value == 1.0
    with pytest.raises(ValueError):
        two_proportion_test(1, 5, 1, 5, test="exact")


def test_adjust_family_skips_undefined_p_values():
    ps = [0.01, None, 0.04, 0.03]
    defined = [0.01, 0.04, 0.03]
    for method in ("holm", "bonferroni"):
        expected = list(multipletests(defined, method=method)[1])
        got = adjust_family(ps, method)
        assert got[1] is None
        assert [got[0], got[2], got[3]] == [approx(p) for p in expected]


def test_comparison_config_names_the_option():
    assert ComparisonConfig().check() == ComparisonConfig("auto", "two-sided")
    with pytest.raises(UserError, match="--test 'exact': choose one of auto, fisher, z"):
        ComparisonConfig(test="exact").check()
    with pytest.raises(UserError, match="--alternative 'smaller'"):
        ComparisonConfig(alternative="smaller").check()


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_seed_comparison_headline_is_welch_on_seeds(alternative):
    a, b = [0.30, 0.42, 0.36], [0.20, 0.26, 0.18]
    counts_a, counts_b = (108, 300), (64, 300)
    cfg = ComparisonConfig(test="fisher", alternative=alternative)
    r = seed_comparison(a, b, counts_a, counts_b, config=cfg)
    t = sps.ttest_ind(a, b, equal_var=False, alternative=alternative)
    head = r["headline"]
    assert (head["test"], head["alternative"], head["unit"], head["pooled"]) == (
        "welch",
        alternative,
        "seed",
        False,
    )
    assert head["p_value"] == approx(t.pvalue) and head["statistic"] == approx(t.statistic)
    assert head["diff"] == approx(np.mean(a) - np.mean(b))
    pooled = r["pooled"]
    fisher = sps.fisher_exact([[108, 192], [64, 236]], alternative=alternative)
    assert (pooled["test"], pooled["alternative"], pooled["pooled"]) == (
        "fisher",
        alternative,
        True,
    )
    assert pooled["p_value"] == approx(fisher.pvalue)
    assert "independent" in pooled["assumption"] and r["note"] is None
    assert (r["n_seeds1"], r["n_seeds2"]) == (3, 3)
    assert_json_clean(r)


def test_seed_comparison_with_one_seed_says_the_count_test_is_the_only_one():
    cfg = ComparisonConfig()
    r = seed_comparison([37 / 280], [12 / 280], (37, 280), (12, 280), config=cfg)
    assert r["headline"]["test"] == "z" and r["headline"]["pooled"] is True
    assert r["headline"]["unit"] == "completion" and r["pooled"] is None
    assert "the count test on completions is the only test" in r["note"]
    mixed = seed_comparison([0.1, 0.2], [0.3], (3, 20), (3, 10), config=cfg)
    assert mixed["headline"]["unit"] == "completion" and "(2 vs 1)" in mixed["note"]
    none = seed_comparison([0.1], [0.3], config=cfg)
    assert none["headline"] is None and none["note"].endswith("no test")
    constant = seed_comparison([0.0, 0.0], [0.0, 0.0], (0, 20), (0, 20), config=cfg)
    assert constant["headline"]["p_value"] is None and "undefined" in constant["note"]
    assert constant["pooled"]["p_value"] == 1.0


def test_adjust_headlines_matches_statsmodels():
    cfg = ComparisonConfig()
    rows = [
        seed_comparison([0.1, 0.2, 0.15], [0.3, 0.35, 0.5], config=cfg),
        seed_comparison([0.0, 0.0], [0.0, 0.0], config=cfg),  # undefined: not in the family
        seed_comparison([0.4, 0.42, 0.41], [0.3, 0.33, 0.36], config=cfg),
        seed_comparison([0.5], [0.45], (50, 100), (45, 100), config=cfg),
    ]
    family = adjust_headlines(rows)
    raw = [rows[i]["headline"]["p_value"] for i in (0, 2, 3)]
    assert family == {"adjusts": "headline.p_value", "methods": ["holm", "bonferroni"], "m": 3}
    for method in ("holm", "bonferroni"):
        expected = multipletests(raw, method=method)[1]
        assert [rows[i][f"p_{method}"] for i in (0, 2, 3)] == [approx(p) for p in expected]
        assert rows[1][f"p_{method}"] is None


def test_describe_test_names_test_alternative_and_pooling():
    pooled = two_proportion_test(1, 10, 5, 10, alternative="less").labelled(pooled=True)
    assert describe_test(pooled) == "fisher, less, pooled"
    assert describe_test(welch_test([1, 2], [3, 5]).labelled()) == "welch, two-sided"
