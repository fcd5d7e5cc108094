"""Pack sequences into steps under a token budget.

Sorting by length groups similar sequences together, so each step fills its
budget and attention blocks stay balanced; results are put back in input order
by the runner.
"""

from __future__ import annotations

from .sequence import Sequence


def plan_steps(seqs: list[Sequence], max_tokens: int, max_seqs: int | None = None,
               first_tokens: int | None = None, shortest_first: bool = False) -> list[list[int]]:
    """Return steps as lists of indices into ``seqs``.

    A step holds at most ``max_tokens`` tokens; a sequence longer than that runs
    alone in its own step. ``first_tokens`` caps the first step lower: when a
    step's inputs are prepared on the CPU (images), a small first step starts
    the GPU sooner, and the next steps are prepared while it runs.
    ``shortest_first`` packs from the shortest sequence up instead of the
    longest down: the first steps then hold the smallest images, many of them,
    whose pixels the worker threads prepare in parallel in a few milliseconds
    (a first step of one 1344 px image waits ~40 ms for one thread).
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=not shortest_first)
    steps: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = len(seqs[i])
        budget = first_tokens if first_tokens is not None and not steps else max_tokens
        full = used + n > budget or (max_seqs is not None and len(current) >= max_seqs)
        if current and full:
            steps.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        steps.append(current)
    return steps
