"""Index ranges as JPIP writes them (``comps=0-9,12``): one parser, one formatter,
shared by server, client and viewer."""
from __future__ import annotations

from typing import Iterable

MAX_SPAN = 1_000_000


def format_ranges(values: Iterable[int], sep: str = ",") -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    vals = sorted(set(int(v) for v in values))
    out, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return sep.join(out)


def parse_ranges(text: str | None) -> set[int]:
    """"0-2,5" -> {0, 1, 2, 5}; "" -> empty set. Raises ValueError on anything else
    (negative numbers, reversed or huge ranges, non-integers)."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"bad range {part!r}: expected N or N-M") from None
        if lo < 0 or hi < lo or hi - lo > MAX_SPAN:
            raise ValueError(f"bad range {part!r}")
        out.update(range(lo, hi + 1))
    return out
