"""Building blocks: non-causal packed attention, M-RoPE rotary, M-RoPE positions, Qwen2.5-VL windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefillonly.models.attention import AttentionMeta, packed_attention
from prefillonly.models.layers import Rotary
from prefillonly.models.spec import RopeSpec
from prefillonly.models.vision import ImageItem, ImageRef
from prefillonly.multimodal import mrope_positions


def test_non_causal_packed_attention_matches_per_sequence_sdpa():
    torch.manual_seed(0)
    lengths = [5, 1, 9]
    q = torch.randn(sum(lengths), 2, 8)
    k = torch.randn(sum(lengths), 2, 8)
    v = torch.randn(sum(lengths), 2, 8)
    meta = AttentionMeta.from_lengths(lengths, torch.device("cpu"))
    out = packed_attention(q, k, v, meta, 8**-0.5, causal=False)
    causal = packed_attention(q, k, v, meta, 8**-0.5)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        ref = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1))
        assert torch.allclose(out[sl], ref.transpose(0, 1), atol=1e-6)
        start += n
    assert not torch.allclose(out, causal)


def test_mrope_rotary_with_equal_rows_is_plain_rope():
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    pos = torch.arange(7)
    for interleaved in (False, True):
        rot = Rotary(RopeSpec(inv, 1.0, (4, 2, 2), interleaved))
        a = rot.cos_sin(pos, torch.float32)
        b = rot.cos_sin(pos.expand(3, -1), torch.float32)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # distinct rows: concatenated sections take t, h, w in blocks; interleaved cycles t, h, w
    rows = torch.stack([torch.full((1,), 1), torch.full((1,), 2), torch.full((1,), 3)])
    cat = Rotary(RopeSpec(torch.ones(8), 1.0, (4, 2, 2), False))._freqs(rows)[0]
    assert cat.tolist() == [1, 1, 1, 1, 2, 2, 3, 3]
    inter = Rotary(RopeSpec(torch.ones(8), 1.0, (4, 2, 2), True))._freqs(rows)[0]
    assert inter.tolist() == [1, 2, 3, 1, 2, 3, 1, 1]


def test_mrope_positions_follow_get_rope_index():
    item = ImageItem("k", 6, (1, 4, 6), None, None)  # merged grid 2 x 3
    refs = [ImageRef(2, item)]
    pos = mrope_positions(10, refs, 2)
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:8].tolist() == [2] * 6
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]
    assert pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert pos[:, 8:].tolist() == [[5, 6]] * 3  # continues from max(2, 3) + 2
