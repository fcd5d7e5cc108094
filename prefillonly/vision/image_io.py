"""Turn whatever a request calls "an image" into a decoded RGB ``PIL.Image``.

Every failure becomes an :class:`~prefillonly.errors.ImageError` that names the
request field and the problem, so one bad image fails its own request with a
clear message instead of crashing a batch.  Size limits are checked *before*
pixels are decoded (or downloaded), so a tiny file that claims to be
100000x100000 pixels, or an endless HTTP response, costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import http.client
import io
import os
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prefillonly.errors import ImageError

__all__ = ["load_image", "image_content_hash", "rgb_pixels", "to_rgb"]

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 50 * 2**20
_CHUNK = 1 << 16
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112


def load_image(
    source: Any,
    *,
    field: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = 10.0,
) -> Image.Image:
    """Load ``source`` and return a fully decoded RGB image.

    ``source`` may be a PIL image, a path (``str`` or ``os.PathLike``), raw
    bytes (``bytes``/``bytearray``/``memoryview``), a binary file-like object,
    a ``data:`` URI or an ``http(s)://`` URL.  EXIF orientation is applied (as
    transformers' ``load_image`` does) and transparency is composited onto
    white (as transformers' image processors do), so the pixels match what
    the reference preprocessing would see.  An RGB PIL image that needs no
    change is returned as is (not copied).
    """
    if isinstance(source, Image.Image):
        img = source
        _check_dimensions(img.size, field, max_pixels)
        _load_pixels(img, field)
        return _finish(img, field)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_byte_count(len(data), field, max_bytes, what="image bytes")
        return _decode(data, field, max_pixels)
    if isinstance(source, str):
        if source.startswith("data:"):
            return _decode(_data_uri_bytes(source, field, max_bytes), field, max_pixels)
        scheme = source.split(":", 1)[0].lower() if ":" in source else ""
        if scheme in ("http", "https"):
            return _decode(_fetch_url(source, field, max_bytes, timeout_s), field, max_pixels)
        return _decode(_read_path(source, field, max_bytes), field, max_pixels)
    if isinstance(source, os.PathLike):
        return _decode(_read_path(os.fspath(source), field, max_bytes), field, max_pixels)
    if hasattr(source, "read"):
        return _decode(_read_limited(source, field, max_bytes, what="file object"), field, max_pixels)
    raise ImageError(
        field,
        f"unsupported image type {type(source).__module__}.{type(source).__qualname__}; "
        "pass a PIL image, a file path, bytes, a binary file object, a data: URI or an http(s) URL",
    )


def image_content_hash(img: Image.Image) -> str:
    """Stable hex digest of an image's mode, size and pixels.

    Two images with the same pixels hash the same however they were loaded
    (path, URL, bytes), which is what a vision-encoder cache needs. SHA-256
    runs on the CPU's SHA extensions at about twice blake2b's speed. An RGB
    image is hashed as RGBA with alpha 255, which Pillow's own memory (RGB
    plus a padding byte) gives with one vectorised OR and no GIL-holding
    ``tobytes`` copy: worker threads hash beside the engine's main thread.
    """
    h = hashlib.sha256()
    h.update(f"{img.mode}|{img.size[0]}x{img.size[1]}|".encode())
    if img.mode != "RGB":
        h.update(img.tobytes())
        return h.hexdigest()
    padded = _pillow_rgbx(img)
    if padded is None:
        h.update(img.convert("RGBA").tobytes())
    else:
        h.update(padded.view(np.uint32) | _OPAQUE)
    return h.hexdigest()


_OPAQUE = np.frombuffer(bytes([0, 0, 0, 255]), dtype=np.uint32)[0]  # the fourth byte of a pixel, either endianness


def _pillow_rgbx(img: Image.Image) -> np.ndarray | None:
    """(height, width, 4) uint8 view of an RGB image's own memory (the fourth byte is padding, of any value),
    through Pillow's Arrow export (Pillow 11.2 and later, images in one block of memory), or None."""
    if not hasattr(img, "__arrow_c_array__"):
        return None
    import pyarrow as pa  # a dependency of prefillonly (the batch jobs read and write Parquet)

    try:
        arr = pa.array(img)
        if not (pa.types.is_fixed_size_list(arr.type) and arr.type.list_size == 4):
            return None
        return arr.values.to_numpy(zero_copy_only=True).reshape(img.height, img.width, 4)
    except (ValueError, TypeError, NotImplementedError, pa.ArrowException):
        return None  # e.g. rows in several blocks


def rgb_pixels(img: Image.Image) -> np.ndarray:
    """The (height, width, 3) uint8 pixels of an RGB image, as a view of Pillow's own memory where it can be had.

    ``np.asarray(img)`` copies through ``Image.tobytes``, which holds the GIL
    for the whole copy: from a worker thread that stalls the thread launching
    the GPU's work. Pillow's Arrow export (see :func:`_pillow_rgbx`) is a view,
    sliced to RGB here; otherwise this is ``np.asarray(img)``.
    """
    padded = _pillow_rgbx(img) if img.mode == "RGB" else None
    return np.asarray(img) if padded is None else padded[:, :, :3]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB exactly as transformers' ``convert_to_rgb`` does in its newer releases.

    Images with an alpha band or a ``transparency`` entry are composited onto
    white (as qwen-vl-utils also does; transformers 5.17 and older dropped the
    alpha band instead); everything else goes through ``Image.convert("RGB")``.
    """
    if img.mode == "RGB" and img.info.get("transparency") is None:
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------- checks


def _check_dimensions(size: tuple[int, int], field: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(field, f"image has zero size ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageError(
            field,
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
            "(possible decompression bomb); downscale it before sending",
        )


def _check_byte_count(n: int, field: str, max_bytes: int, *, what: str) -> None:
    if n > max_bytes:
        raise ImageError(field, f"{what} too large: {n} bytes, above the limit of {max_bytes} bytes")


# --------------------------------------------------------------------------- decoding


def _decode(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Open lazily, check the header's dimensions, then decode the pixels."""
    if not data:
        raise ImageError(field, "image data is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(field, f"image dimensions are too large (possible decompression bomb): {e}") from e
    except UnidentifiedImageError as e:
        zero = _sniff_zero_size(data)
        if zero is not None:
            raise ImageError(field, f"image has zero size ({zero[0]}x{zero[1]} pixels)") from e
        raise ImageError(field, f"data is not a decodable image ({len(data)} bytes; starts with {data[:8]!r})") from e
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
        raise ImageError(field, f"image header is corrupt: {type(e).__name__}: {e}") from e
    _check_dimensions(img.size, field, max_pixels)
    _load_pixels(img, field)
    return _finish(img, field)


def _load_pixels(img: Image.Image, field: str) -> None:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(field, f"image dimensions are too large (possible decompression bomb): {e}") from e
    except Exception as e:  # noqa: BLE001 - truncated files raise OSError, others SyntaxError/ValueError
        fmt = img.format or "image"
        raise ImageError(field, f"{fmt} data is truncated or corrupt: {e}") from e


def _finish(img: Image.Image, field: str) -> Image.Image:
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Exception as e:  # noqa: BLE001
        raise ImageError(field, f"cannot convert image (mode {img.mode}) to RGB: {e}") from e


def _sniff_zero_size(data: bytes) -> tuple[int, int] | None:
    """Read PNG/GIF header dimensions, which PIL refuses to report when zero."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
    elif data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
    else:
        return None
    return (w, h) if w == 0 or h == 0 else None


# --------------------------------------------------------------------------- sources


def _read_path(path: str, field: str, max_bytes: int) -> bytes:
    shown = path if len(path) <= 200 else path[:200] + "..."
    hint = ""
    if len(path) > 200 or path.startswith(("iVBOR", "/9j/", "R0lG", "UklGR")):
        hint = " (base64 image data must be sent as a data URI: data:image/png;base64,...)"
    try:
        if os.path.isdir(path):
            raise ImageError(field, f"path is a directory, not an image file: {shown!r}")
        _check_byte_count(os.path.getsize(path), field, max_bytes, what="image file")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise ImageError(field, f"file not found: {shown!r}{hint}") from e
    except ImageError:
        raise
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) or e.errno == errno.ENAMETOOLONG:
            # Not something a file could be called: say what we accept.
            raise ImageError(field, f"not an existing file path, an http(s) URL or a data: URI: {shown!r}{hint}") from e
        reason = e.strerror or str(e)
        raise ImageError(field, f"cannot read image file {shown!r}: {reason}") from e


def _read_limited(stream: Any, field: str, max_bytes: int, *, what: str) -> bytes:
    try:
        data = stream.read(max_bytes + 1)
    except Exception as e:  # noqa: BLE001
        raise ImageError(field, f"cannot read {what}: {type(e).__name__}: {e}") from e
    if isinstance(data, str):
        raise ImageError(field, f"{what} is open in text mode; open it in binary mode ('rb')")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(field, f"{what}.read() returned {type(data).__name__}, expected bytes")
    _check_byte_count(len(data), field, max_bytes, what=what)
    return bytes(data)


def _data_uri_bytes(uri: str, field: str, max_bytes: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError(field, "malformed data URI: no ',' separating the header from the data")
    if header[5:].split(";")[-1].strip().lower() == "base64":
        payload = "".join(payload.split())  # tolerate line breaks
        # 4 base64 chars encode 3 bytes: reject before decoding anything.
        _check_byte_count(len(payload) // 4 * 3, field, max_bytes, what="data URI image")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(field, f"data URI has invalid base64 data: {e}") from e
    data = urllib.parse.unquote_to_bytes(payload)
    _check_byte_count(len(data), field, max_bytes, what="data URI image")
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), never to ftp:// or file://."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"refusing redirect to non-http URL {newurl!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _fetch_url(url: str, field: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET ``url`` with a total deadline, reading at most ``max_bytes + 1`` bytes."""
    deadline = time.monotonic() + timeout_s
    shown = url if len(url) <= 200 else url[:200] + "..."
    request = urllib.request.Request(url, headers={"User-Agent": "prefillonly-image-fetch"})
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.strip().isdigit():
                _check_byte_count(int(length), field, max_bytes, what=f"image at {shown}")
            chunks: list[bytes] = []
            total = 0
            while total <= max_bytes:
                if time.monotonic() > deadline:
                    raise ImageError(field, f"timed out after {timeout_s:g}s downloading {shown}")
                chunk = resp.read(min(_CHUNK, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            _check_byte_count(total, field, max_bytes, what=f"image at {shown}")
            return b"".join(chunks)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(field, f"HTTP {e.code} {e.reason} fetching {shown}") from e
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            raise ImageError(field, f"timed out after {timeout_s:g}s fetching {shown}") from e
        raise ImageError(field, f"could not fetch {shown}: {reason}") from e
    except TimeoutError as e:
        raise ImageError(field, f"timed out after {timeout_s:g}s fetching {shown}") from e
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise ImageError(field, f"could not fetch {shown}: {type(e).__name__}: {e}") from e
