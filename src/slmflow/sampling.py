"""`evaluate.max_examples`: a stratified, seeded sample of an eval set, read as a stream.

Two passes over the rows, memory for the sample alone: the first counts each label's rows, the
second keeps, per label, the rows with the smallest sha256(seed, line number). A label's share of
the sample is its share of the set (largest remainders get the rows left over, ties by label
order). Ordering by a hash of the line number, not by position, gives the same rows whatever
order the file is in, and every model evaluated on the set gets the same rows.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

Row = dict[str, Any]


def allocate(counts: dict[str, int], size: int) -> dict[str, int]:
    """Rows per label: proportional to `counts`, summing to min(size, all rows)."""
    total = sum(counts.values())
    if size >= total:
        return dict(counts)
    exact = {label: size * n / total for label, n in counts.items()}
    share = {label: int(x) for label, x in exact.items()}
    left = size - sum(share.values())
    order = sorted(counts, key=lambda label: (share[label] - exact[label], list(counts).index(label)))
    for label in order[:left]:
        share[label] += 1
    return share


def _rank(seed: int, line: Any) -> bytes:
    return hashlib.sha256(f"{seed}:{line}".encode()).digest()


def stratified_sample(rows: Callable[[], Iterable[Row]], size: int, seed: int,
                      label_key: str = "label", line_key: str = "line") -> tuple[list[Row], dict[str, Any]]:
    """(the sampled rows in their order in the set, what was sampled). `rows()` gives a fresh
    pass over the set each call."""
    counts = Counter(row[label_key] for row in rows())
    counts = Counter(dict(sorted(counts.items())))
    share = allocate(counts, size)
    kept: dict[str, list[tuple[bytes, int, Row]]] = {label: [] for label in share}
    for position, row in enumerate(rows()):
        heap, k = kept[row[label_key]], share[row[label_key]]
        if not k:
            continue
        item = (_invert(_rank(seed, row[line_key])), position, row)  # a max-heap of the k smallest
        if len(heap) < k:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    chosen = sorted((pos, row) for heap in kept.values() for _, pos, row in heap)
    record = {"rows": len(chosen), "of": sum(counts.values()), "seed": seed,
              "labels": {label: share[label] for label in sorted(share)}}
    return [row for _, row in chosen], record


def _invert(digest: bytes) -> bytes:
    """Bytes that sort the other way (heapq keeps the smallest first)."""
    return bytes(255 - b for b in digest)
