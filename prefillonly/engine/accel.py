"""Speed options of the engine, resolved once per loaded model.

``fused_kernels``  the fused Triton decoder layer (models.fastpath) and the Qwen vision towers'
                   rotary and add+norm kernels (models.vision.qwen_vit). Default:
                   on for CUDA float16/bfloat16 when Triton is importable.
``cuda_graphs``    replay captured CUDA graphs for steps under
                   ``GRAPH_MAX_TOKENS`` tokens (engine.graphs). Default: on for CUDA text
                   decoders in float16/bfloat16 without soft-capping (``graph_blocker``).
``prefill_chunk_size``  hybrid prefilling for a prompt longer than this that runs
                   alone in its step: token-wise work (norms, projections, rotary,
                   MLP) runs in chunks of this many tokens, so activation memory
                   stays bounded (see models.fastpath). Multi-sequence steps are
                   bounded by ``max_num_batched_tokens`` and run whole. Default:
                   ``DEFAULT_CHUNK`` on CUDA; off (``None``) on CPU, where the plain
                   modules chunk only their MLP. ``0`` turns it off.

On CPU every default leaves the plain float32 modules exactly as they are.
"""

from __future__ import annotations

import torch

from ..errors import InvalidRequestError

DEFAULT_CHUNK = 8192
GRAPH_MAX_TOKENS = 512


def graph_blocker(model, dtype: torch.dtype) -> str | None:
    """Why a step of this model cannot be replayed from a CUDA graph, or None. A graph keeps everything the host
    decided at capture: attention must take each replay's sequence offsets from the device (torch's varlen
    kernel), and steps under ``GRAPH_MAX_TOKENS`` must stay below the fused path's multi-sequence kernel, whose
    tile list is built on the host."""
    from ..models.attention import kernel_takes
    from ..models.decoder import CausalLM

    if type(model) is not CausalLM:
        return "only text decoders are captured"
    if not kernel_takes(dtype, model.spec.attn_softcap):
        what = "soft-capped attention" if model.spec.attn_softcap is not None else f"attention in {dtype}"
        return f"{what} runs the portable path, which reads sequence lengths on the host (use float16 or bfloat16)"
    return None


def configure(model, device: torch.device, dtype: torch.dtype, fused_kernels: bool | None = None,
              cuda_graphs: bool | None = None, prefill_chunk_size: int | None = None):
    """Apply the options to ``model``; returns the ``StepGraphs`` for the runner, or None."""
    from ..models import fastpath

    for name, value in (("fused_kernels", fused_kernels), ("cuda_graphs", cuda_graphs)):
        if value is not None and not isinstance(value, bool):
            raise InvalidRequestError(name, f"must be True, False or None (auto); got {value!r}")
    if prefill_chunk_size is not None and (not isinstance(prefill_chunk_size, int) or isinstance(prefill_chunk_size, bool)
                                           or prefill_chunk_size < 0):
        raise InvalidRequestError("prefill_chunk_size", f"must be a non-negative int or None (auto); got {prefill_chunk_size!r}")
    cuda = device.type == "cuda"
    layers = getattr(getattr(model, "model", None), "layers", None) or []

    reason = fastpath.supported(model, device, dtype)
    if fused_kernels and reason is not None:
        raise InvalidRequestError("fused_kernels", f"cannot be used here: {reason}")
    use_fused = reason is None if fused_kernels is None else fused_kernels
    if layers:
        fastpath.enable(model, use_fused)
    tower = getattr(model, "tower", None)
    if tower is not None and hasattr(tower, "fused"):  # a Qwen vision tower: the same kernels' conditions
        tower.fused = use_fused

    chunk = (DEFAULT_CHUNK if cuda else None) if prefill_chunk_size is None else (prefill_chunk_size or None)
    for layer in layers:
        layer.mlp_chunk = chunk

    if cuda_graphs and not cuda:
        raise InvalidRequestError("cuda_graphs", "needs a CUDA device")
    blocker = graph_blocker(model, dtype)
    if cuda_graphs and blocker is not None:
        raise InvalidRequestError("cuda_graphs", f"cannot be used here: {blocker}")
    use_graphs = (cuda and blocker is None) if cuda_graphs is None else cuda_graphs
    if not use_graphs:
        return None
    from .graphs import StepGraphs

    return StepGraphs(model, device, max_tokens=GRAPH_MAX_TOKENS)
