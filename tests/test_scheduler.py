"""Step planning: every sequence exactly once, each step within its token budget, the first one capped lower."""

from __future__ import annotations

import random

import pytest

from prefillonly.engine.scheduler import plan_steps
from prefillonly.engine.sequence import Pooling, Sequence


def _seqs(lengths: list[int]) -> list[Sequence]:
    return [Sequence(token_ids=[1] * n, select=Pooling.LAST) for n in lengths]


@pytest.mark.parametrize("first", [None, 100, 1000])
def test_budgets_and_coverage(first: int | None) -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 900) for _ in range(300)] + [5000]  # one longer than the budget
    seqs = _seqs(lengths)
    steps = plan_steps(seqs, 4000, first_tokens=first)
    assert sorted(i for step in steps for i in step) == list(range(len(seqs)))
    for k, step in enumerate(steps):
        budget = first if first is not None and k == 0 else 4000
        tokens = sum(lengths[i] for i in step)
        assert tokens <= budget or len(step) == 1, (k, tokens, budget)
    if first is not None:  # the first step is the longest sequence alone or a few under the cap
        assert sum(lengths[i] for i in steps[0]) <= max(first, 5000)
        assert len(steps) >= len(plan_steps(seqs, 4000))


def test_shortest_first_puts_the_smallest_sequences_in_the_first_step() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(1, 900) for _ in range(200)]
    seqs = _seqs(lengths)
    steps = plan_steps(seqs, 4000, first_tokens=500, shortest_first=True)
    assert sorted(i for step in steps for i in step) == list(range(len(seqs)))
    first = [lengths[i] for i in steps[0]]
    assert sum(first) <= 500 and max(first) <= min(lengths[i] for step in steps[1:] for i in step)
    assert sorted(first) == sorted(lengths)[: len(first)]
    assert all(sum(lengths[i] for i in step) <= 4000 for step in steps)
