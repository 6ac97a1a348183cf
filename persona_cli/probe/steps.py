"""Per-step aggregates of probe replay rows (summary.json and probe-uat both use these).

Everything here is recomputed from the `step_NNNNNN.jsonl.gz` rows, never stored only as an
aggregate. Definitions, per step:

- `hack_rate`: mean of `hacked` over the step's rows.
- `mean_cos`: mean plain cosine over rows with a non-null `cos`; `mean_cos_hacked` and
  `mean_cos_clean` split it by the label.
- `mean_cos_in`, `mean_cos_out`: mean over every (row, module) pair whose `cos_in` is defined
  of `cos_in` and of `cos_out`, the same pairs for both. A working projection makes
  mean_cos_out < mean_cos_in whenever it fired anywhere (probe-uat T3); a projection that did
  nothing leaves them equal.
- `frac_fired`: fired (row, module) pairs / pairs with a defined cos_in.
- `ratio_*`: importance-ratio statistics over rows that carry them (old logprobs present).

    stats = step_stats(rows_of_one_step)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def step_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    cos = [r["cos"] for r in rows if r["cos"] is not None]
    pairs_in, pairs_out, fired = [], [], 0
    for r in rows:
        for m, c_in in r["cos_in"].items():
            if c_in is None:
                continue
            pairs_in.append(c_in)
            pairs_out.append(r["cos_out"][m])
            fired += bool(r["fired"][m])
    ratios = [r for r in rows if r.get("ratio_mean") is not None]
    by_label = {
        label: [r["cos"] for r in rows if r["cos"] is not None and r["hacked"] is label]
        for label in (True, False)
    }
    nll = {
        label: [r["nll"] for r in rows if r["nll"] is not None and r["hacked"] is label]
        for label in (True, False)
    }
    return {
        "step": rows[0]["step"] if rows else None,
        "rows": len(rows),
        "in_update": sum(bool(r["in_update"]) for r in rows),
        "null_cos": len(rows) - len(cos),
        "hack_rate": _mean([float(r["hacked"]) for r in rows]),
        "mean_cos": _mean(cos),
        "mean_cos_hacked": _mean(by_label[True]),
        "mean_cos_clean": _mean(by_label[False]),
        "mean_nll_hacked": _mean(nll[True]),
        "mean_nll_clean": _mean(nll[False]),
        "module_pairs": len(pairs_in),
        "mean_cos_in": _mean(pairs_in),
        "mean_cos_out": _mean(pairs_out),
        "frac_fired": fired / len(pairs_in) if pairs_in else None,
        "ratio_rows": len(ratios),
        "ratio_mean": _mean([r["ratio_mean"] for r in ratios]),
        "ratio_max": max((r["ratio_max"] for r in ratios), default=None),
        "ratio_min": min((r["ratio_min"] for r in ratios), default=None),
        "ratio_frac_clipped": _mean([r["ratio_frac_clipped"] for r in ratios]),
    }


def finite_or_none(x: float) -> float | None:
    """NaN (an undefined cosine) becomes null in rows."""
    return None if math.isnan(x) else float(x)
