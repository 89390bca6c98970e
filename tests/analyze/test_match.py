"""The row matchers of ``diff``'s alignment, checked against a plain reference on random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from vlmscope.analyze.match import match_in_groups, match_sorted


def _reference(ga, ka, gb, kb):
    """Equal (group, key) pairs, repeated ones in order of occurrence; group -1 never matches."""
    seen: dict[tuple, list[int]] = {}
    for j, (g, k) in enumerate(zip(gb.tolist(), kb.tolist())):
        if g >= 0:
            seen.setdefault((g, k), []).append(j)
    ia, ib = [], []
    for i, (g, k) in enumerate(zip(ga.tolist(), ka.tolist())):
        q = seen.get((g, k)) if g >= 0 else None
        if q:
            ia.append(i)
            ib.append(q.pop(0))
    return np.asarray(ia, np.int64), np.asarray(ib, np.int64)


def _groups(rng, n_groups, same_sizes):
    """Rows of calls (group = call id, key = (op, occurrence) packed, as the reshapes' keys
    include the call), the groups interleaved in row order like nested calls."""
    sizes_a = rng.integers(1, 8, n_groups)
    sizes_b = sizes_a.copy() if same_sizes else np.maximum(1, sizes_a + rng.integers(-1, 2, n_groups))
    out = []
    for sizes in (sizes_a, sizes_b):
        g = np.repeat(np.arange(n_groups), sizes)
        k = g * 100 + np.concatenate([rng.permutation(s) if rng.random() < 0.2 else np.arange(s) for s in sizes])
        o = np.argsort(g + rng.random(len(g)) * 3, kind="stable")     # interleave neighbouring calls
        out += [g[o].astype(np.int64), k[o].astype(np.int64)]
    return out


@pytest.mark.parametrize("seed", range(40))
def test_match_in_groups_equals_matching_by_key(seed):
    rng = np.random.default_rng(seed)
    ga, ka, gb, kb = _groups(rng, int(rng.integers(1, 60)), same_sizes=seed % 4 != 0)
    ga[rng.random(len(ga)) < 0.05] = -1       # rows that match nothing (unaligned calls)
    if seed % 4 == 1:
        gb[rng.random(len(gb)) < 0.05] = -1
    if seed % 5 == 2:
        kb[rng.integers(0, len(kb))] = 10**9    # a key on one side only
    ia, ib = match_in_groups(ga, ka, gb, kb)
    ra, rb = _reference(ga, ka, gb, kb)
    assert np.array_equal(ia, ra) and np.array_equal(ib, rb)


def test_match_sorted_pairs_repeated_keys_in_order():
    ia, ib = match_sorted(np.array([5, 3, 5, 7]), np.array([5, 5, 3, 9]))
    assert ia.tolist() == [0, 1, 2] and ib.tolist() == [0, 2, 1]
