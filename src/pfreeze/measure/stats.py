"""Confidence intervals: mean, standard deviation and a 95% Student-t interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Two-sided 97.5% Student-t quantiles for small samples; normal beyond the table.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t_quantile(df: int) -> float:
    if df <= 0:
        return float("nan")
    keys = [k for k in sorted(_T975) if k <= df]
    return _T975[keys[-1]] if df <= 30 else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, object]:
    """Mean, sample std and a 95% t-interval over `values`."""
    n = len(values)
    mean = statistics.fmean(values) if n else float("nan")
    std = statistics.stdev(values) if n > 1 else 0.0
    half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    ci = [mean - half, mean + half] if n > 1 else [None, None]
    return {"mean": mean, "std": std, "ci95": ci, "n": n, "values": list(values)}

