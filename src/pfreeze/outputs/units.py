"""Numbers a reader takes in at a glance: a figure in its unit (ms, k tok/s, %, MiB, nats)
and mean ± half-width of a 95% interval with as many decimals as the interval supports.

`2.325e+05 ± 4.3e+02` tokens/s reads `232.5 ± 0.4 k tok/s`; `0.01762 ± 3.3e-05` s reads
`17.62 ± 0.03 ms`.
"""

from __future__ import annotations

import math
from typing import Any

DASH = "—"

# unit -> (scale applied to the stored value, suffix). Stored values are SI-ish as pfreeze
# writes them: seconds, tokens/s, fractions, MiB, nats/token, counts.
UNITS: dict[str, tuple[float, str]] = {
    "ms": (1e3, " ms"),
    "ktok/s": (1e-3, " k tok/s"),
    "%": (100.0, "%"),
    "pp": (100.0, " pp"),  # a difference of two percentages: percentage points
    "MiB": (1.0, " MiB"),
    "nats": (1.0, ""),
    "params": (1.0, ""),
}


def _finite(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def _decimals(half: float | None, default: int) -> int:
    """Decimals that keep two significant digits of the interval's half-width (the last digit
    that means anything), or `default` without an interval."""
    if half is None or half <= 0:
        return default
    return max(0, min(6, 1 - math.floor(math.log10(half))))


def fmt(value: Any, unit: str, half: Any = None, default: int = 3, bare: bool = False) -> str:
    """`value` (± `half`) in `unit`: '17.62 ± 0.03 ms', '1,234,567', '52.3%'. `bare`: the
    value alone, with the decimals `half` supports."""
    v = _finite(value)
    if v is None:
        return DASH
    scale, suffix = UNITS[unit]
    h = _finite(half)
    v, h = v * scale, None if h is None else abs(h) * scale
    if unit == "params" and (h is None or h == 0):
        return f"{round(v):,}"
    digits = _decimals(h, 1 if unit in ("ms", "ktok/s", "%", "pp", "MiB") else default)
    text = f"{v:,.{digits}f}"
    if h is not None and not bare:
        text += f" ± {h:,.{digits}f}"
    return text + suffix


def diff_unit(unit: str) -> str:
    """The unit of a difference of two figures in `unit` (percentages differ in points)."""
    return "pp" if unit == "%" else unit


def fmt_stats(s: dict[str, Any] | None, unit: str, signed: bool = False) -> str:
    """A statistics entry ({mean, ci95}) as mean ± half-width; '+' on positive differences."""
    if not s or _finite(s.get("mean")) is None:
        return DASH
    lo, hi = (s.get("ci95") or [None, None])[:2]
    half = (hi - lo) / 2 if _finite(lo) is not None and _finite(hi) is not None else None
    text = fmt(s["mean"], unit, half)
    return f"+{text}" if signed and s["mean"] > 0 and not text.startswith("+") else text


def fmt_ci(s: dict[str, Any] | None, unit: str) -> str:
    """The interval itself, '[−0.9, −0.2] ms', or '—' where there is none."""
    if not s:
        return DASH
    lo, hi = (s.get("ci95") or [None, None])[:2]
    if _finite(lo) is None or _finite(hi) is None:
        return DASH
    if lo == hi:
        return "exact: the same in every repeat"
    half = (hi - lo) / 2
    a, b = fmt(lo, unit, half, bare=True), fmt(hi, unit, half, bare=True)
    suffix = UNITS[unit][1]
    return f"[{a.removesuffix(suffix)}, {b}]" if suffix else f"[{a}, {b}]"
