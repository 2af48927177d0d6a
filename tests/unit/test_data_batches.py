"""Index batches are deterministic: the same (seed, epoch) always gives the same batches, and every
index appears exactly once per epoch."""

from __future__ import annotations

from prefalign.data import batches


def test_batches_are_deterministic_and_cover_every_index_once():
    first = batches(10, 3, seed=7, epoch=0)
    assert first == batches(10, 3, seed=7, epoch=0)
    assert first != batches(10, 3, seed=7, epoch=1)
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert sorted(i for b in first for i in b) == list(range(10))


def test_batches_in_order_and_drop_last():
    assert batches(7, 3, seed=0, epoch=0, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches(7, 3, seed=0, epoch=0, shuffle=False, drop_last=True) == [[0, 1, 2], [3, 4, 5]]
