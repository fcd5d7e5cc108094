"""Rescale + normalise uint8 pixels through a lookup table, bit-exact with transformers.

transformers' PIL backend computes ``float32(float64(v) * rescale_factor)`` and
then ``(x - float32(mean)) / float32(std)`` in float32.  With uint8 input each
channel has only 256 possible outputs, so we compute those 256 values with the
very same numpy operations once and gather: identical bits, a fraction of the
work, and it can be applied after patch reordering on the 4x smaller uint8 data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["normalization_lut", "apply_lut"]


def normalization_lut(
    num_channels: int,
    *,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: float | Sequence[float],
    std: float | Sequence[float],
) -> np.ndarray:
    """Return a ``(num_channels, 256)`` float32 table of the processed value of each uint8 level."""
    levels = np.arange(256, dtype=np.uint8)
    if do_rescale:
        values = (levels.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        values = levels.astype(np.float32)
    table = np.repeat(values[None, :], num_channels, axis=0)
    if do_normalize:
        mean_arr = _per_channel(mean, num_channels, "image_mean")
        std_arr = _per_channel(std, num_channels, "image_std")
        table = (table - mean_arr[:, None]) / std_arr[:, None]
    return np.ascontiguousarray(table, dtype=np.float32)


def apply_lut(pixels: np.ndarray, lut: np.ndarray, channel_axis: int) -> np.ndarray:
    """Map uint8 ``pixels`` through ``lut``; ``channel_axis`` says which axis holds the channels."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"apply_lut expects uint8 pixels, got {pixels.dtype}")
    axis = channel_axis % pixels.ndim
    shape = [1] * pixels.ndim
    shape[axis] = lut.shape[0]
    channels = np.arange(lut.shape[0], dtype=np.intp).reshape(shape)
    return lut[channels, pixels]


def _per_channel(value: float | Sequence[float], num_channels: int, name: str) -> np.ndarray:
    if isinstance(value, (int, float)):
        value = [float(value)] * num_channels
    arr = np.asarray(list(value), dtype=np.float32)
    if arr.shape != (num_channels,):
        raise ValueError(f"{name} must have {num_channels} elements, got {list(value)}")
    return arr
