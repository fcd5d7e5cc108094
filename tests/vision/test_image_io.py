"""load_image: every accepted source, and a clear ImageError for every bad one."""

from __future__ import annotations

import base64
import http.server
import io
import pathlib
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import skimage.data
from PIL import Image

from prefillonly.errors import ImageError, InvalidRequestError
from prefillonly.vision.image_io import image_content_hash, load_image, rgb_pixels, to_rgb

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea())  # 451x300 RGB


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def assert_image_error(excinfo: pytest.ExceptionInfo[ImageError], *words: str, field: str = "image") -> None:
    err = excinfo.value
    assert isinstance(err, InvalidRequestError)
    assert err.field == field
    msg = str(err).lower()
    for w in words:
        assert w.lower() in msg, f"{w!r} not in {str(err)!r}"


# --------------------------------------------------------------------------- good sources


def test_all_sources_give_same_pixels(photo: Image.Image, tmp_path: pathlib.Path) -> None:
    data = encode(photo)
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    sources = [
        photo,
        str(path),
        path,
        data,
        bytearray(data),
        memoryview(data),
        io.BytesIO(data),
        uri,
        "data:image/png;base64," + base64.encodebytes(data).decode(),  # with line breaks
    ]
    expected = np.asarray(photo)
    for src in sources:
        img = load_image(src)
        assert img.mode == "RGB" and img.size == photo.size, type(src)
        np.testing.assert_array_equal(np.asarray(img), expected)


def test_open_binary_file(photo: Image.Image, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cat.jpg"
    path.write_bytes(encode(photo, "JPEG", quality=90))
    with open(path, "rb") as f:
        img = load_image(f)
    assert img.size == photo.size and img.mode == "RGB"


def test_modes_converted_like_transformers(photo: Image.Image) -> None:
    gray = photo.convert("L")
    assert load_image(encode(gray)).mode == "RGB"
    # Transparency is composited onto white, as transformers' convert_to_rgb does.
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)
    out = np.asarray(load_image(encode(rgba)))
    assert (out == 255).all()
    half = photo.convert("RGBA")
    half.putalpha(128)
    np.testing.assert_array_equal(np.asarray(load_image(half)), np.asarray(to_rgb(half)))
    palette = photo.convert("P")
    assert load_image(encode(palette, "GIF")).mode == "RGB"


def test_exif_orientation_applied(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = load_image(encode(photo, "JPEG", exif=exif))
    assert img.size == (photo.height, photo.width)


def test_content_hash(photo: Image.Image) -> None:
    h = image_content_hash(photo)
    assert h == image_content_hash(load_image(encode(photo)))
    assert h == image_content_hash(photo.copy())
    changed = photo.copy()
    changed.putpixel((0, 0), (0, 0, 1))
    assert image_content_hash(changed) != h
    a = Image.frombytes("RGB", (2, 3), bytes(range(18)))
    b = Image.frombytes("RGB", (3, 2), bytes(range(18)))
    assert image_content_hash(a) != image_content_hash(b)
    assert len(h) >= 32 and int(h, 16) >= 0
    grey = photo.convert("L")
    assert image_content_hash(grey) != image_content_hash(grey.convert("RGB"))  # the mode counts
    # Pillow's padding byte differs between a resized image and the same pixels decoded: the hash does not
    resized = photo.resize((123, 77), Image.Resampling.BICUBIC)
    assert image_content_hash(resized) == image_content_hash(Image.frombytes("RGB", resized.size, resized.tobytes()))


def test_content_hash_without_a_view_of_pillow_memory(photo: Image.Image, monkeypatch) -> None:
    """Older Pillow, or an image in several blocks of memory: the same digest, through a copy."""
    from prefillonly.vision import image_io

    images = [photo, photo.resize((123, 77)), Image.new("RGB", (5, 1), (1, 2, 3))]
    with_view = [image_content_hash(img) for img in images]
    monkeypatch.setattr(image_io, "_pillow_rgbx", lambda img: None)
    assert [image_content_hash(img) for img in images] == with_view


def test_rgb_pixels_are_the_array_pixels(photo: Image.Image) -> None:
    """A view of Pillow's memory where it can be had (no GIL-holding copy), else the usual copy: same pixels."""
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2100, 2100, 3), dtype=np.uint8))  # > 16 MiB
    for img in (photo, photo.resize((333, 517)), Image.new("RGB", (5, 1), (1, 2, 3)), big):
        got = rgb_pixels(img)
        assert got.shape == (img.height, img.width, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.asarray(img))


# --------------------------------------------------------------------------- bad sources


def test_file_not_found(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ImageError) as ei:
        load_image(str(tmp_path / "missing.png"), field="documents[3]")
    assert_image_error(ei, "not found", "missing.png", field="documents[3]")
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path / "missing.png")
    assert_image_error(ei, "not found")


def test_bare_base64_hints_data_uri(photo: Image.Image) -> None:
    with pytest.raises(ImageError) as ei:
        load_image(base64.b64encode(encode(photo)).decode())
    assert_image_error(ei, "data URI", "data:image/png;base64")
    assert len(str(ei.value)) < 600  # the message does not echo megabytes of base64
    with pytest.raises(ImageError) as ei:
        load_image(base64.b64encode(encode(photo.resize((8, 8)))).decode())  # short enough to be a file name
    assert_image_error(ei, "not found", "data:image/png;base64")


def test_directory_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path)
    assert_image_error(ei, "directory")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(photo: Image.Image, fmt: str) -> None:
    data = encode(photo, fmt)
    with pytest.raises(ImageError) as ei:
        load_image(data[: len(data) // 2])
    assert_image_error(ei, "truncated")


def test_non_image_bytes() -> None:
    with pytest.raises(ImageError) as ei:
        load_image(b"this is not an image, just some text" * 10)
    assert_image_error(ei, "not a decodable image")
    with pytest.raises(ImageError) as ei:
        load_image(b"")
    assert_image_error(ei, "empty")


def test_zero_size() -> None:
    with pytest.raises(ImageError) as ei:
        load_image(Image.new("RGB", (0, 0)))
    assert_image_error(ei, "zero size", "0x0")
    with pytest.raises(ImageError) as ei:
        load_image(Image.new("RGB", (10, 0)))
    assert_image_error(ei, "zero size")
    with pytest.raises(ImageError) as ei:
        load_image(png_header_only(0, 10))
    assert_image_error(ei, "zero size", "0x10")


def test_decompression_bomb_rejected_before_decoding() -> None:
    # Beyond PIL's own hard limit: PIL's DecompressionBombError becomes an ImageError.
    t0 = time.monotonic()
    with pytest.raises(ImageError) as ei:
        load_image(png_header_only(100_000, 100_000))
    assert_image_error(ei, "decompression bomb")
    # Below PIL's limit but above ours: refused from the header alone (the file has
    # no pixel data, so decoding would have failed with "truncated" instead).
    with pytest.raises(ImageError) as ei:
        load_image(png_header_only(9000, 9000))
    assert_image_error(ei, "81000000", "limit", "decompression bomb")
    with pytest.raises(ImageError) as ei:
        load_image(Image.new("RGB", (200, 200)), max_pixels=100 * 100)
    assert_image_error(ei, "limit")
    assert time.monotonic() - t0 < 2.0


def test_too_many_bytes(photo: Image.Image, tmp_path: pathlib.Path) -> None:
    data = encode(photo)
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for src in (data, io.BytesIO(data), str(path), uri):
        with pytest.raises(ImageError) as ei:
            load_image(src, max_bytes=1000)
        assert_image_error(ei, "too large", "1000")


def test_bad_data_uris() -> None:
    with pytest.raises(ImageError) as ei:
        load_image("data:image/png;base64,@@@not-base64@@@")
    assert_image_error(ei, "base64")
    with pytest.raises(ImageError) as ei:
        load_image("data:image/png;base64")
    assert_image_error(ei, "malformed data uri")
    with pytest.raises(ImageError) as ei:
        load_image("data:image/png;base64," + base64.b64encode(b"hello world").decode())
    assert_image_error(ei, "not a decodable image")


@pytest.mark.parametrize(
    "source, type_name",
    [(42, "int"), (3.5, "float"), (None, "NoneType"), ([b"x"], "list"), (np.zeros((4, 4, 3), np.uint8), "ndarray")],
)
def test_unsupported_type(source: object, type_name: str) -> None:
    with pytest.raises(ImageError) as ei:
        load_image(source)
    assert_image_error(ei, "unsupported image type", type_name)


def test_text_mode_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("hello")
    with open(path) as f, pytest.raises(ImageError) as ei:
        load_image(f)
    assert_image_error(ei, "binary mode")


# --------------------------------------------------------------------------- URLs


def test_unreachable_url_fails_fast() -> None:
    t0 = time.monotonic()
    with pytest.raises(ImageError) as ei:
        load_image("http://127.0.0.1:9/x.png", timeout_s=5.0)
    assert_image_error(ei, "could not fetch", "127.0.0.1:9")
    assert time.monotonic() - t0 < 3.0


class _Handler(http.server.BaseHTTPRequestHandler):
    png: bytes = b""

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path == "/cat.png":
            self._send(200, self.png, "image/png")
        elif self.path == "/big.bin":
            self._send(200, b"\0" * 5000, "application/octet-stream")
        elif self.path == "/big-no-length.bin":
            # No Content-Length: the size limit must be enforced while reading.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"\0" * 1000)
        elif self.path == "/slow.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(self.png[:100])
            self.wfile.flush()
            time.sleep(2.0)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/redirect-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/text":
            self._send(200, b"<html>not an image</html>", "text/html")
        else:
            self._send(404, b"nope", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that stop reading early (size limit, timeout) are expected here


@pytest.fixture(scope="module")
def server(photo: Image.Image) -> Iterator[str]:
    _Handler.png = encode(photo)
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_url_ok(server: str, photo: Image.Image) -> None:
    img = load_image(server + "/cat.png")
    np.testing.assert_array_equal(np.asarray(img), np.asarray(photo))
    img = load_image(server + "/redirect")
    assert img.size == photo.size


def test_url_errors(server: str) -> None:
    with pytest.raises(ImageError) as ei:
        load_image(server + "/missing.png")
    assert_image_error(ei, "404")
    with pytest.raises(ImageError) as ei:
        load_image(server + "/text")
    assert_image_error(ei, "not a decodable image")
    with pytest.raises(ImageError) as ei:
        load_image(server + "/redirect-file")
    assert_image_error(ei, "redirect", "file:///etc/passwd", "not allowed")


def test_url_too_large(server: str) -> None:
    with pytest.raises(ImageError) as ei:
        load_image(server + "/big.bin", max_bytes=4096)
    assert_image_error(ei, "too large", "5000")
    with pytest.raises(ImageError) as ei:
        load_image(server + "/big-no-length.bin", max_bytes=4096)
    assert_image_error(ei, "too large", "4097")


def test_url_timeout(server: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ImageError) as ei:
        load_image(server + "/slow.png", timeout_s=0.5)
    assert_image_error(ei, "timed out")
    assert time.monotonic() - t0 < 1.8
