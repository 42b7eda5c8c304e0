"""Which teacher layer each student layer learns from (TinyBERT's n = g(m)).

Layers are 1-based; 0 is the embedding layer and M+1 the prediction layer, always mapped to the
teacher's 0 and N+1, so they are not part of the returned list.
"""
from __future__ import annotations

from collections.abc import Sequence

from pipeline.errors import BertforgeError

STRATEGIES = ("uniform", "top", "bottom")


def layer_mapping(teacher_layers: int, student_layers: int, strategy: str | Sequence[int] = "uniform") -> list[int]:
    """Teacher layer g(m) for student layers m = 1..M, strictly increasing.

    - "uniform": g(m) = m*N/M, rounded up when N/M is not whole, so the student's last layer always
      learns from the teacher's last one (12 -> 4: [3, 6, 9, 12]; 6 -> 4: [2, 3, 5, 6]). Rounding up
      keeps the list strictly increasing because consecutive values differ by N/M >= 1.
    - "top": the last M teacher layers; "bottom": the first M.
    - a list (or "3,6,9,12"): used as given after validation.
    """
    n, m = teacher_layers, student_layers
    if m < 1 or n < 1:
        raise BertforgeError(f"layer mapping needs at least one layer on each side (teacher {n}, student {m})")
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        strategy = parse_layers(strategy, what="layer mapping")
    if isinstance(strategy, str):
        if m > n:
            raise BertforgeError(f"impossible layer mapping: a {m}-layer student cannot map one-to-one onto a "
                                 f"{n}-layer teacher (at most {n} student layers)")
        if strategy == "uniform":
            return [-(-k * n // m) for k in range(1, m + 1)]  # ceil(k*n/m) in integers
        if strategy == "top":
            return list(range(n - m + 1, n + 1))
        return list(range(1, m + 1))
    layers = [int(x) for x in strategy]
    if len(layers) != m:
        raise BertforgeError(f"impossible layer mapping {layers}: the student has {m} layers, the list names {len(layers)}")
    if any(not 1 <= x <= n for x in layers):
        raise BertforgeError(f"impossible layer mapping {layers}: teacher layers are 1..{n}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise BertforgeError(f"impossible layer mapping {layers}: teacher layers must be strictly increasing")
    return layers


def parse_layers(text: str, what: str = "layer list") -> list[int]:
    """"3,6,9,12" -> [3, 6, 9, 12] (a user-typed list of 1-based layers)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise BertforgeError(f"bad {what} {text!r}: use one of {', '.join(STRATEGIES)} or comma-separated "
                             "1-based teacher layers like 3,6,9,12") from None
