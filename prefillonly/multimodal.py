"""Prompts with images: chat content parts or ``images=``, rendered and expanded to placeholder tokens.

The text-only path (:class:`~prefillonly.prompts.PromptEncoder`) is untouched;
a vision-language checkpoint gets :class:`MultimodalPromptEncoder`, which also
accepts

* chat messages whose ``content`` is a list of parts: ``{"type": "text", "text": ...}``,
  ``{"type": "image", "image": <PIL | path | bytes | file object | data: URI | URL>}`` and
  OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``;
* a plain string with ``images=``: the string's ``<|vision_start|><|image_pad|><|vision_end|>``
  (Qwen) or ``<image>`` (LLaVA) markers are filled in order, or, when it has none, one
  marker per image is put before the text;
* ``{"text": ..., "image": ... | "images": [...]}`` and ``{"content": [parts]}`` items, and a
  bare image (PIL image or bytes).

Each image's marker becomes as many placeholder tokens as the preprocessor
says (Qwen: t*h*w/merge^2; LLaVA-NeXT: the anyres feature count). After a task
has built its sequences, :meth:`MultimodalPromptEncoder.finish` finds each
image's placeholder run in every sequence and attaches the images and, for
M-RoPE models, the (3, n) positions, computed like transformers'
``get_rope_index``. An image that cannot be used raises ``ImageError``, which
fails only its own request.
"""

from __future__ import annotations

import os
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch

from .errors import ImageError, InvalidRequestError
from .models.vision import ImageItem, ImageRef, VisionInfo
from .prompts import PromptEncoder, batch_of, check_chat, is_role_chat, is_token_ids

QWEN_IMAGE_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
LLAVA_IMAGE_MARKER = "<image>"


def is_image_source(value: Any) -> bool:
    """A value that can only be an image (not text, not a list of ids)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, (Image.Image, bytes, bytearray, memoryview, ImageItem)) or (
        hasattr(value, "read") and not isinstance(value, (str, os.PathLike))
    )


def image_part_source(part: dict) -> tuple[bool, Any]:
    """(is an image part, its source) for one chat content part."""
    kind = part.get("type")
    if kind == "image_url" or "image_url" in part:
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        return True, url
    if kind == "image" or "image" in part:
        for key in ("image", "url", "path"):
            if part.get(key) is not None:
                return True, part[key]
        return True, None
    return False, None


def as_mm_batch(prompts: Any, field: str) -> tuple[list[Any], bool]:
    """Like :func:`prompts.as_batch`, but a list of role-less dicts is a batch, and an image is one item."""
    return batch_of(prompts, field, _is_one_mm_prompt,
                    "a string, chat messages, an image, a {'text', 'image'} dict, or a list of these")


def _is_one_mm_prompt(value: Any) -> bool:
    return (isinstance(value, (str, dict)) or is_token_ids(value) or is_image_source(value)
            or is_role_chat(value))


def align_images(images: Any, n: int, single: bool, field: str = "images") -> list[list[Any]] | None:
    """Per-item image lists from ``images=``: one image or a list for a single prompt, else one entry per item."""
    if images is None:
        return None
    if single:
        return [list(images) if isinstance(images, (list, tuple)) else [images]]
    if not isinstance(images, (list, tuple)) or len(images) != n:
        got = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
        raise InvalidRequestError(field, f"for a batch, pass one entry (None, an image or a list of images) per item: {n} expected, got {got}")
    out = []
    for entry in images:
        if entry is None:
            out.append([])
        elif isinstance(entry, (list, tuple)):
            out.append(list(entry))
        else:
            out.append([entry])
    return out


class MultimodalPromptEncoder(PromptEncoder):
    """Tokenises prompts with images for one vision-language checkpoint."""

    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, info: VisionInfo, processor, model_dir=None) -> None:
        super().__init__(tokenizer, max_model_len, vocab_size)
        self.info = info
        self.processor = processor
        self.pad_id = info.image_token_id
        if info.kind == "llava_next":
            self.marker = LLAVA_IMAGE_MARKER
        else:
            self.marker = QWEN_IMAGE_MARKER
        self.pad_text = tokenizer.convert_ids_to_tokens(self.pad_id)
        template = getattr(tokenizer, "chat_template", None) or ""
        # A template that renders image parts itself; otherwise we inline the markers as text.
        self.template_has_images = isinstance(template, str) and "image" in template
        self._pending: list[Any] | None = None
        self._recorded: list[ImageItem] = []
        self._by_source: dict[tuple, ImageItem] = {}  # sources seen in this call (kept alive by the caller)
        # Chats of a call often differ only in their images: each distinct text is rendered and tokenised once.
        self._rendered: dict[Any, str] = {}
        self._text_ids: dict[str, list[int]] = {}

    # -- the per-request protocol LLM._run drives ------------------------------------------------

    def begin(self, images: list[Any] | None) -> None:
        """Start a request; ``images`` are its ``images=`` (or None)."""
        self._pending = list(images) if images else None
        self._recorded = []

    def finish(self, seqs: list, field: str) -> list:
        """Attach this request's images (and M-RoPE positions) to each of its sequences."""
        if self._pending:
            raise InvalidRequestError("images", f"{field}: {len(self._pending)} image(s) were passed but the prompt did not use them")
        for seq in seqs:
            refs = self.place(seq.token_ids, self._recorded, field)
            if refs:
                seq.extras["images"] = refs
                if self.info.mrope:
                    seq.extras["positions"] = mrope_positions(len(seq), refs, self.info.merge_size)
        return seqs

    def mark(self) -> int:
        """A point to :meth:`rollback` to: a task that renders a prompt again drops the first rendering's images."""
        return len(self._recorded)

    def rollback(self, mark: int) -> None:
        del self._recorded[mark:]

    def reset(self) -> None:
        """Forget the images of a finished call."""
        self._pending, self._recorded, self._by_source = None, [], {}
        self._rendered, self._text_ids = {}, {}

    # -- images ----------------------------------------------------------------------------------

    def load(self, source: Any, field: str) -> ImageItem:
        """Decode, hash and size one image; pixels are preprocessed later, only if needed."""
        if isinstance(source, ImageItem):
            return source
        if source is None:
            raise ImageError(field, "image part has no image; give 'image', 'url' or 'image_url'")
        # The same object (or path / URL) used by several requests of one call is decoded once;
        # a file object could not be read twice anyway.
        memo = ("s", source) if isinstance(source, str) else ("id", id(source))
        known = self._by_source.get(memo)
        if known is not None:
            return known
        item = self._load(source, field)
        self._by_source[memo] = item
        return item

    def _load(self, source: Any, field: str) -> ImageItem:
        from .vision.image_io import load_image
        from .vision.preprocess_pool import shared_executor

        img = load_image(source, field=field)
        proc = self.processor
        if self.info.kind == "llava_next":
            n = proc.num_tokens_for_size(img.height, img.width, field=field)
            grid = None
            tag = "llava"
        else:
            grid = proc.grid_thw_for_size(img.height, img.width, field=field)
            n = grid[0] * grid[1] * grid[2] // self.info.merge_size**2
            tag = f"{grid[0]}x{grid[1]}x{grid[2]}"
        # Hashing the pixels costs more than rendering a prompt: a worker thread does it meanwhile.
        key = shared_executor().submit(_content_key, img, tag)
        return ImageItem(key, n, grid, img, partial(proc, field=field))

    # -- prompts ---------------------------------------------------------------------------------

    def encode(self, prompt: Any, field: str, add_special_tokens: bool = True) -> list[int]:
        pending, self._pending = self._pending, None
        if isinstance(prompt, str):
            if not prompt.strip() and not pending:
                raise InvalidRequestError(field, "prompt is empty; pass non-empty text")
            return self.encode_text(prompt, pending or [], field, add_special_tokens)
        if is_role_chat(prompt):
            return self.encode_chat(prompt, field, extra_images=pending)
        if is_image_source(prompt) or isinstance(prompt, dict):
            text, sources = self.item_parts(prompt, field)
            return self.encode_text(text, sources + (pending or []), field, add_special_tokens)
        if pending:
            raise InvalidRequestError("images", f"{field}: images= needs a text or chat prompt, not token ids")
        return super().encode(prompt, field, add_special_tokens)

    def item_parts(self, item: Any, field: str) -> tuple[str, list[Any]]:
        """(text, image sources) of a bare image or a ``{"text", "image"/"images"}`` / ``{"content"}`` dict."""
        if is_image_source(item):
            return "", [item]
        if "content" in item and "role" not in item:
            content = item["content"]
            if isinstance(content, str):
                return content, []
            if not isinstance(content, list):
                raise InvalidRequestError(field, "'content' must be a string or a list of parts")
            text, sources = [], []
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise InvalidRequestError(f"{field}.content[{j}]", "each part must be a dict")
                is_img, src = image_part_source(part)
                if is_img:
                    sources.append(src)
                elif isinstance(part.get("text"), str):
                    text.append(part["text"])
                else:
                    raise InvalidRequestError(f"{field}.content[{j}]", "a part needs 'text' or an image")
            return "".join(text), sources
        unknown = set(item) - {"text", "image", "images", "image_url"}
        if unknown:
            raise InvalidRequestError(field, f"unknown keys {sorted(unknown)}; use 'text' and 'image' or 'images'")
        text = item.get("text") or ""
        if not isinstance(text, str):
            raise InvalidRequestError(field, f"'text' must be a string; got {type(text).__name__}")
        sources = []
        if item.get("image") is not None:
            sources.append(item["image"])
        if item.get("image_url") is not None:
            url = item["image_url"]
            sources.append(url.get("url") if isinstance(url, dict) else url)
        imgs = item.get("images")
        if imgs is not None:
            sources.extend(imgs if isinstance(imgs, (list, tuple)) else [imgs])
        return text, sources

    def encode_text(self, text: str, sources: list[Any], field: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenise ``text``; fill its image markers with ``sources`` (or put markers first when it has none)."""
        if sources and self.pad_text not in text:
            text = self.marker * len(sources) + ("\n" if self.info.kind == "llava_next" and text else "") + text
        if not text.strip():
            raise InvalidRequestError(field, "prompt is empty; pass text or an image")
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return self.expand(ids, [self.load(s, f"{field}.images[{j}]") for j, s in enumerate(sources)], field)

    def render_messages(self, messages: list[dict], field: str, extra_images: list[Any] | None = None):
        """(rendered text, image sources in order) of chat messages with content parts."""
        check_chat(messages, field, parts=True)
        sources: list[Any] = []
        out = []
        for j, m in enumerate(messages):
            content = m["content"]
            if isinstance(content, str):
                out.append(dict(m))
                continue
            parts = []
            for k, part in enumerate(content):
                where = f"{field}[{j}].content[{k}]"
                if not isinstance(part, dict):
                    raise InvalidRequestError(where, "each content part must be a dict")
                is_img, src = image_part_source(part)
                if is_img:
                    if m.get("role") == "system":
                        raise InvalidRequestError(where, "a system message cannot contain images")
                    sources.append(src)
                    parts.append({"type": "image"})
                elif isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise InvalidRequestError(where, "a part needs 'text' or an image ('image' / 'image_url')")
            out.append({**m, "content": parts})
        if extra_images:
            if sources:
                raise InvalidRequestError("images", f"{field}: pass images either inside the messages or with images=, not both")
            users = [m for m in out if m.get("role") == "user"]
            if not users:
                raise InvalidRequestError("images", f"{field}: images= needs a user message to attach to")
            first = users[0]
            text = first["content"] if isinstance(first["content"], str) else None
            parts = [{"type": "image"} for _ in extra_images]
            first["content"] = parts + ([{"type": "text", "text": text}] if text is not None else first["content"])
            sources = list(extra_images)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequestError(field, "this model's tokenizer has no chat template; pass plain text with images=")
        if not self.template_has_images:  # a text-only template: inline the markers
            for m in out:
                if isinstance(m["content"], list):
                    m["content"] = "".join(self.marker if p["type"] == "image" else p["text"] for p in m["content"])
        key = _frozen(out)
        text = self._rendered.get(key) if key is not None else None
        if text is None:
            text = self.tokenizer.apply_chat_template(out, add_generation_prompt=True, tokenize=False)
            if key is not None:
                self._rendered[key] = text
        return text, sources

    def encode_chat(self, messages: list[dict], field: str, extra_images: list[Any] | None = None) -> list[int]:
        text, sources = self.render_messages(messages, field, extra_images)
        known = self._text_ids.get(text)
        if known is None:
            known = self._text_ids[text] = self.tokenizer.encode(text, add_special_tokens=False)
        ids = list(known)  # each sequence owns its ids
        items = [self.load(s, f"{field}.images[{j}]") for j, s in enumerate(sources)]
        return self.expand(ids, items, field)

    def render_chat(self, messages: list[dict[str, Any]], field: str) -> list[int]:
        return self.encode_chat(messages, field)

    # -- placeholder tokens ----------------------------------------------------------------------

    def expand(self, ids: list[int], items: list[ImageItem], field: str) -> list[int]:
        """Replace the i-th placeholder token with ``items[i].num_tokens`` of them; record the items."""
        pad = self.pad_id
        count = ids.count(pad)
        if count != len(items):
            raise InvalidRequestError(
                field, f"the prompt has {count} image placeholder(s) ({self.pad_text}) but {len(items)} image(s)"
            )
        if not items:
            return ids
        out: list[int] = []
        pos = 0
        for item in items:
            at = ids.index(pad, pos)
            out.extend(ids[pos:at])
            out.extend([pad] * item.num_tokens)
            pos = at + 1
        out.extend(ids[pos:])
        self._recorded.extend(items)
        return out

    def place(self, ids: list[int], items: list[ImageItem], field: str) -> list[ImageRef]:
        """Where each image's placeholder run starts in ``ids`` (after any truncation and templating)."""
        pad = self.pad_id
        refs: list[ImageRef] = []
        pos = 0
        for item in items:
            try:
                start = ids.index(pad, pos)
            except ValueError:
                raise InvalidRequestError(field, "truncation removed an image from the prompt; raise truncate or shorten the text") from None
            stop = start + item.num_tokens
            if ids[start:stop].count(pad) != item.num_tokens:
                raise InvalidRequestError(field, "truncation cut through an image; raise truncate or shorten the text")
            refs.append(ImageRef(start, item))
            pos = stop
        if pad in ids[pos:]:
            raise InvalidRequestError(field, f"token {pad} ({self.pad_text}) appears without an image; pass the image")
        return refs


def mrope_positions(n: int, refs: list[ImageRef], merge: int) -> torch.Tensor:
    """(3, n) M-RoPE positions of one sequence, as transformers' ``get_rope_index`` computes them.

    Text tokens get equal (t, h, w) positions counting on from the previous
    token; an image's tokens get (start, start + row, start + col) over its
    merged grid, and the text after it continues from the largest position
    used so far plus one. Built in numpy: torch's CPU ops share their thread
    pool with the image workers, and a small op can then stall for milliseconds.
    """
    pos = np.empty((3, n), dtype=np.int64)
    cur = prev = 0
    for ref in refs:
        gap = ref.start - prev
        pos[:, prev : ref.start] = np.arange(cur, cur + gap)
        cur += gap
        block, span = _image_positions(ref.item.grid, merge)
        np.add(block, cur, out=pos[:, ref.start : ref.stop])
        cur += span
        prev = ref.stop
    pos[:, prev:] = np.arange(cur, cur + n - prev)
    return torch.from_numpy(pos)


@lru_cache(maxsize=1024)
def _image_positions(grid: tuple[int, int, int], merge: int) -> tuple[np.ndarray, int]:
    """(3, tokens) positions of an image of this grid relative to its start, and how far the text after it moves
    on. Computed once per grid: a batch's images mostly share a few grids."""
    t, h, w = grid
    gh, gw = h // merge, w // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    block = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])
    block.setflags(write=False)
    return block, max(gh, gw)


class _Unfrozen(TypeError):
    """A value :func:`_frozen` does not know how to compare."""


def _frozen(value: Any) -> Any:
    """A hashable copy of rendered chat messages (dicts, lists and scalars, each tagged with its type, so that
    ``1`` and ``True`` differ as they may in a template), or None for anything else: those are rendered again."""
    try:
        return _freeze(value)
    except _Unfrozen:
        return None


def _freeze(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ("dict", tuple((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if value is None or isinstance(value, (int, float)):
        return (type(value).__name__, value)
    raise _Unfrozen(type(value).__name__)


def _content_key(img: Any, tag: str) -> str:
    """The encoder-cache key: the pixels' hash and how the image is preprocessed (its grid)."""
    from .vision.image_io import image_content_hash

    return f"{image_content_hash(img)}:{tag}"
