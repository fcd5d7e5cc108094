"""CUDA graphs for small steps, where kernel launches (not the GPU) set the time.

A step of n tokens and s sequences runs as the replay of a graph captured for
(bucket, s), bucket being the next power of two above n (at least 16). The
tokens past n form one extra padding sequence of their own, so they never
attend to or from real tokens; the graph's attention bound (``max_seqlen``)
is the bucket. Graphs are captured lazily, on first use of their key, share
one memory pool, and only the decoder (``model.hidden_states``) is captured:
row selection, the final norm and the task head run eagerly on the first n rows (the
last layer's tail, ``StepInput.tail``, is not used in a graph). A replay sees only
the device tensors it copies in, so models whose attention reads the host's
sequence lengths get no graphs (``engine.accel.graph_blocker``).
"""

from __future__ import annotations

import torch

from ..models.attention import AttentionMeta
from .batch import StepInput

MIN_BUCKET = 16


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << n.bit_length())  # > n: at least one padding token


class StepGraphs:
    """Captured decoder graphs keyed by (token bucket, number of sequences)."""

    def __init__(self, model, device: torch.device, max_tokens: int = 512, max_seqs: int = 16,
                 max_graphs: int = 64) -> None:
        self.model = model
        self.device = device
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None
        self.failed: str | None = None  # set if capture failed once: run eagerly from then on

    def accepts(self, step: StepInput) -> bool:
        if self.failed is not None or step.positions.dim() != 1:
            return False
        n, s = step.num_tokens, len(step.seqs)
        if n >= self.max_tokens or s > self.max_seqs or any(q.extras for q in step.seqs):
            return False
        return (_bucket(n), s) in self.graphs or len(self.graphs) < self.max_graphs

    def run(self, step: StepInput) -> torch.Tensor:
        """The step's hidden states as ``model.hidden_states(step)`` gives them: (n, hidden), a view into the
        graph's static output, or the rows of ``step.tail`` (graphs are captured for every row)."""
        n, s = step.num_tokens, len(step.seqs)
        key = (_bucket(n), s)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(*key)
        return graph.replay(step)

    def _capture(self, bucket: int, num_seqs: int) -> "_Graph":
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return _Graph(self.model, self.device, bucket, num_seqs, self.pool)


class _Graph:
    def __init__(self, model, device, bucket: int, num_seqs: int, pool) -> None:
        self.bucket, self.num_seqs = bucket, num_seqs
        self.ids = torch.zeros(bucket, dtype=torch.long, device=device)
        self.pos = torch.zeros(bucket, dtype=torch.long, device=device)
        # real sequences, then the padding sequence up to the bucket; offsets are set per replay
        cu = [0] * (num_seqs + 1) + [bucket]
        self.cu = torch.tensor(cu, dtype=torch.int32, device=device)
        # a valid layout for warm-up and capture: one token per real sequence
        self.cu[: num_seqs + 1] = torch.arange(num_seqs + 1, dtype=torch.int32, device=device)
        lengths = [1] * num_seqs + [bucket - num_seqs]

        def static_step() -> StepInput:
            meta = AttentionMeta(self.cu, list(lengths), bucket)  # fresh: no per-step caches carried in
            return StepInput(self.ids, self.pos, meta, [], torch.zeros(0, dtype=torch.long, device=device), None)

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                model.hidden_states(static_step())
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = model.hidden_states(static_step())

    def replay(self, step: StepInput) -> torch.Tensor:
        n = step.num_tokens
        self.ids[:n].copy_(step.input_ids)
        self.pos[:n].copy_(step.positions)
        self.cu[: self.num_seqs + 1].copy_(step.meta.cu_seqlens)
        self.graph.replay()
        return self.out[:n] if step.tail is None else self.out.index_select(0, step.tail.index)
