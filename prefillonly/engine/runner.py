"""Run sequences through the model step by step and hand back each one's head output."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..errors import OutOfMemoryError
from .batch import StepInput, build_step
from .scheduler import plan_steps
from .sequence import Head, Pooling, Sequence

StepObserver = Callable[[StepInput], None]
# A model whose steps need CPU preparation (images) gets a first step of 1/FIRST_STEP_FRACTION of the budget:
# the GPU starts once a few images are ready instead of a full step's worth.
FIRST_STEP_FRACTION = 8
# ... and its steps run from the shortest sequences up, so the first steps' images are the quickest to prepare.
SHORTEST_FIRST = True


class ModelRunner:
    """Owns the model on its device; executes packed steps under a token budget."""

    def __init__(self, model, device: torch.device, max_num_batched_tokens: int) -> None:
        self.model = model
        self.device = device
        self.max_num_batched_tokens = max_num_batched_tokens
        self.observers: list[StepObserver] = []  # tests and profilers watch steps here
        self.tokens_processed = 0  # running total, read by batch jobs for tokens/s
        self.graphs = None  # engine.graphs.StepGraphs: CUDA graphs for small steps (set by the LLM)

    def run(self, seqs: list[Sequence], head: Head) -> list[torch.Tensor | Exception]:
        """Outputs in the order of ``seqs``: a (rows, K) CPU tensor, or the error of that sequence."""
        results: list[torch.Tensor | Exception | None] = [None] * len(seqs)
        for i, out in self.stream(iter([seqs]), head):
            results[i] = out
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def stream(self, windows: Iterator[list[Sequence]], head: Head) -> Iterator[tuple[int, torch.Tensor | Exception]]:
        """Run sequences that arrive in windows; yield (index in arrival order, output) as each step is read back.

        The next window is taken (so the caller validates and tokenises it)
        while the GPU runs the steps already queued (a window's last two steps
        are read back only after the next window's first step is queued), and the caller builds
        results while later steps run: a long call's first step starts after one
        window, not after the whole batch. Each window joins a pool planned under
        the token budget; the pool's last, partly filled step waits for the next
        window, so steps stay full. A model with ``prepare_steps`` (images) gets
        a small first step, and its worker threads prepare the inputs of each
        window's next steps meanwhile; a sequence whose input failed there gets
        that error while the rest of its step runs.

        On CUDA the steps are pipelined: step k+1 is built and queued before the
        results of step k are read back, so the host's packing and launches
        overlap the GPU's work and the GPU does not wait between steps.
        """
        prepare = getattr(self.model, "prepare_steps", None)
        first = self.max_num_batched_tokens // FIRST_STEP_FRACTION if prepare is not None else None
        seqs: list[Sequence] = []
        pool: list[int] = []
        pending: list = []
        window = next(windows, None)
        while window is not None or pool:
            if window is not None:
                seqs.extend(window)
                pool.extend(range(len(seqs) - len(window), len(seqs)))
            plan = plan_steps([seqs[i] for i in pool], self.max_num_batched_tokens, first_tokens=first,
                              shortest_first=prepare is not None and SHORTEST_FIRST)
            steps = [[pool[j] for j in step] for step in plan]
            # the last, partly filled step waits for the next window (not the small first step itself)
            pool = steps.pop() if window is not None and len(steps) > (first is not None) else []
            first = None
            ready = prepare([[seqs[i] for i in step] for step in steps]) if prepare is not None and steps else None
            try:
                for k, step in enumerate(steps):
                    ids = step
                    if ready is not None:
                        failed = next(ready)
                        pending.extend((step[j], error) for j, error in failed.items())
                        ids = [i for j, i in enumerate(step) if j not in failed]
                    launched = list(self._run_step([seqs[i] for i in ids], head, ids)) if ids else []
                    if k == len(steps) - 1 and window is not None:
                        pending.extend(launched)  # the next window is checked while both last steps run
                    else:
                        yield from self._collected(pending)
                        pending = launched
                    self.tokens_processed += sum(len(seqs[i]) for i in step)
            finally:
                if ready is not None:
                    ready.close()
            window = next(windows, None) if window is not None else None
        yield from self._collected(pending)

    @staticmethod
    def _collected(pending: list) -> Iterator[tuple[int, torch.Tensor | Exception]]:
        for i, out in pending:
            yield i, out.get() if isinstance(out, _Pending) else out

    def _run_step(self, seqs: list[Sequence], head: Head, ids: list[int]):
        try:
            outs = self._execute(seqs, head)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(seqs) == 1:
                n = len(seqs[0])
                yield ids[0], OutOfMemoryError(f"a {n}-token request did not fit in device memory even alone")
                return
            half = len(seqs) // 2
            yield from self._run_step(seqs[:half], head, ids[:half])
            yield from self._run_step(seqs[half:], head, ids[half:])
            return
        yield from zip(ids, outs)

    def _execute(self, seqs: list[Sequence], head: Head) -> list:
        step = build_step(seqs, self.device)
        for observe in self.observers:
            observe(step)
        if self.graphs is not None and self.graphs.accepts(step):
            hidden = self.graphs.run(step)
        else:
            hidden = self.model.hidden_states(step)
        rows = self._select_rows(hidden, step)
        out = head(self.model, rows, step.targets).float()
        sizes = [s.num_rows for s in seqs]
        if out.device.type != "cuda":
            return list(out.cpu().split(sizes))
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        shared = _StepOutput(host, done, sizes)
        return [_Pending(shared, i) for i in range(len(sizes))]

    def _select_rows(self, hidden: torch.Tensor, step: StepInput) -> torch.Tensor:
        """Final-normed rows in sequence order; MEAN sequences contribute their mean."""
        if not any(s.select is Pooling.MEAN for s in step.seqs):
            return self.model.final_norm(hidden.index_select(0, step.row_index))
        normed = self.model.final_norm(hidden)
        pieces, offset, r = [], 0, 0
        for s in step.seqs:
            n = len(s)
            if s.select is Pooling.MEAN:
                pieces.append(normed[offset : offset + n].float().mean(0, keepdim=True).to(normed.dtype))
            else:
                k = s.num_rows
                pieces.append(normed.index_select(0, step.row_index[r : r + k]))
                r += k
            offset += n
        return torch.cat(pieces)


class _StepOutput:
    """A step's head output whose device-to-host copy may still be in flight; read back once."""

    __slots__ = ("host", "done", "sizes", "parts")

    def __init__(self, host: torch.Tensor, done, sizes: list[int]) -> None:
        self.host, self.done, self.sizes, self.parts = host, done, sizes, None

    def part(self, i: int) -> torch.Tensor:
        if self.parts is None:
            self.done.synchronize()
            # one pageable copy per step (pinned memory is scarce), split into per-sequence views
            self.parts = self.host.clone().split(self.sizes)
            self.host = None
        return self.parts[i]


class _Pending:
    """One sequence's rows of a step's output."""

    __slots__ = ("step", "index")

    def __init__(self, step: _StepOutput, index: int) -> None:
        self.step, self.index = step, index

    def get(self) -> torch.Tensor:
        return self.step.part(self.index)
