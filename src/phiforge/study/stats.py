"""The statistics of a study with several seeds: mean and spread per route, and which differences are real.

Every route of a study runs the same seeds, and a seed fixes both the initial weights and the data order for
every route. So a route is compared with the reference seed by seed: the paired difference d_s = x_s - ref_s,
its mean, and its standard error sd(d) / sqrt(n). A difference "exceeds two standard errors" when
|mean d| > 2 SE (roughly a 95% interval that excludes 0; with 3 seeds a t interval would be wider, so read
it as a screen, not a test). The unpaired view (difference of the means, Welch's SE sqrt(sd_a^2/n_a +
sd_b^2/n_b)) ignores the pairing and is shown beside it.
"""

from __future__ import annotations

import math
import statistics


def describe(values) -> dict | None:
    """{"mean", "sd" (n - 1; None for one value), "n"} of the values that are not None; None when there are none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals)}


def _verdict(diff: float, se: float | None) -> bool | None:
    return None if se is None else abs(diff) > 2 * se


def paired(ref: dict, other: dict) -> dict | None:
    """ref, other: {seed: value}. The paired difference other - ref over the seeds both have a value for."""
    seeds = sorted(s for s in ref if s in other and ref[s] is not None and other[s] is not None)
    if not seeds:
        return None
    d = describe(other[s] - ref[s] for s in seeds)
    se = d["sd"] / math.sqrt(d["n"]) if d["sd"] is not None else None
    return {"n": d["n"], "seeds": seeds, "mean_diff": d["mean"], "se": se, "exceeds_2se": _verdict(d["mean"], se)}


def unpaired(ref: dict, other: dict) -> dict | None:
    """The difference of the two means with Welch's standard error (needs two values on each side)."""
    a, b = describe(ref.values()), describe(other.values())
    if a is None or b is None:
        return None
    se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"]) if a["sd"] is not None and b["sd"] is not None \
        else None
    diff = b["mean"] - a["mean"]
    return {"diff": diff, "se": se, "exceeds_2se": _verdict(diff, se)}


def compare(per_seed: dict[str, dict], reference: str, metrics) -> list[dict]:
    """per_seed: {route: {metric: {seed: value}}}. One row per (route other than the reference, metric) that
    both have values for: the paired and the unpaired comparison with the reference."""
    rows = []
    ref = per_seed.get(reference)
    if ref is None:
        return rows
    for route, values in per_seed.items():
        if route == reference:
            continue
        for metric in metrics:
            p = paired(ref.get(metric, {}), values.get(metric, {}))
            if p is not None:
                rows.append({"route": route, "metric": metric, **p,
                             "unpaired": unpaired(ref.get(metric, {}), values.get(metric, {}))})
    return rows
