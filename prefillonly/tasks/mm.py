"""Score and embed with images: Qwen3-VL-Reranker, jina-reranker-m0 and Qwen3-VL-Embedding semantics.

* Qwen3-VL-Reranker: the checkpoint's chat template renders a system turn
  (Qwen3-Reranker's judge prompt) and a user turn
  ``<Instruct>: {i}<Query>:{images}{text}\\n<Document>:{images}{text}``; the
  score is sigmoid(logit_yes - logit_no) at the last position.
* jina-reranker-m0: ``**Document**:\\n{doc}\\n**Query**:\\n{query}`` (an image
  stands in for the text as ``<|vision_start|><|image_pad|><|vision_end|>``), then
  token id 100; score = sigmoid(MLP(h_last) - 2.65), the MLP being the
  checkpoint's ``score`` head.
* Qwen3-VL-Embedding: system turn = the instruction (default "Represent the
  user's input."), user turn = images then text; last-token pooling, L2-normalised.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Callable

import torch

from ..engine.sequence import Pooling, Sequence
from ..errors import InvalidRequestError
from ..outputs import EmbedResult, ScoreResult
from .base import ScoreHead, Task
from .embed import IdentityHead
from .score import QWEN3_RERANKER, YesNoHead, cut, document_room

VL_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
VL_RERANK_SYSTEM = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
VL_EMBED_INSTRUCTION = "Represent the user's input."
JINA_SCORE_TOKEN_ID = 100


def split_item(enc, item: Any, field: str) -> tuple[str, list[Any]]:
    """(text, image sources) of a query or document: a string, an image, or a text/image dict."""
    if isinstance(item, str):
        return item, []
    from ..multimodal import is_image_source

    if is_image_source(item) or isinstance(item, dict):
        return enc.item_parts(item, field)
    raise InvalidRequestError(
        field, f"expected a string, an image, or a {{'text', 'image'}} dict; got {type(item).__name__}"
    )


def fit_document(enc, render: Callable[[str], list[int]], text: str, truncate: int | None, side: str,
                 field: str, what: str = "document") -> list[int]:
    """``render(text)``, with ``text`` cut (on ``side``) until the whole prompt fits.

    Only the document's (or the embedded input's) own text is cut: the chat
    template, the instruction, the query and the images stay whole, and the
    prompt ends up within ``min(truncate, max_model_len)`` tokens. The text is
    cut in tokens and decoded; re-rendering can shift a token at the seam, so a
    few rounds settle the length.
    """
    mark = enc.mark()
    ids = render(text)
    limit = enc.max_model_len if truncate is None else min(truncate, enc.max_model_len)
    if len(ids) <= limit:
        return ids
    tok = enc.tokenizer
    doc = tok.encode(text, add_special_tokens=False) if text else []
    keep = document_room(len(ids) - len(doc), len(doc), enc.max_model_len, truncate, field, what)
    for _ in range(8):
        piece = tok.decode(cut(doc, keep, side))
        piece = piece.rstrip("\ufffd") if side == "right" else piece.lstrip("\ufffd")  # half a character
        enc.rollback(mark)
        ids = render(piece)
        if len(ids) <= limit:
            return ids
        keep -= len(ids) - limit
        if keep < 1:
            break
    raise InvalidRequestError(field, f"truncate={truncate} leaves no room for the {what}; raise truncate")


class MultimodalScoreTask(Task[ScoreResult]):
    """Relevance of (query, document) pairs where either side may hold images."""

    name = "score"

    def __init__(self, enc, query: Any, query_images: list[Any] | None, instruction: str | None,
                 truncate: int | None, side: str, style: str) -> None:
        self.enc = enc
        self.style = style  # "qwen3_vl" (yes/no) or "jina" (score head)
        self.instruction = VL_RERANK_INSTRUCTION if instruction is None else instruction
        self.truncate, self.side = truncate, side
        text, sources = split_item(enc, query, "query")
        sources = sources + list(query_images or [])
        if not text.strip() and not sources:
            raise InvalidRequestError("query", "must be non-empty text or hold an image")
        self.query_text = text
        # Decode the query's images once; every pair reuses them (and the encoder cache, their features).
        enc.reset()
        self.query_items = [enc.load(s, f"query.images[{j}]") for j, s in enumerate(sources)]
        if style == "jina":
            self.head = ScoreHead()
        else:
            tok = enc.tokenizer
            yes = tok.encode(QWEN3_RERANKER.yes, add_special_tokens=False)
            no = tok.encode(QWEN3_RERANKER.no, add_special_tokens=False)
            if len(yes) != 1 or len(no) != 1:
                raise InvalidRequestError("model", "the tokenizer must encode 'yes' and 'no' as one token each")
            self.head = YesNoHead(yes[0], no[0])

    def sequences(self, item, field, enc):
        text, sources = split_item(enc, item, field)
        sources = sources + (enc._pending or [])
        enc._pending = None
        if not text.strip() and not sources:
            raise InvalidRequestError(field, "document is empty")
        doc_items = [enc.load(s, f"{field}.images[{j}]") for j, s in enumerate(sources)]
        build = self._jina_ids if self.style == "jina" else self._qwen_ids
        ids = fit_document(enc, lambda t: build(enc, t, doc_items, field), text, self.truncate, self.side, field)
        return [Sequence(ids, Pooling.LAST)]

    def _qwen_ids(self, enc, doc_text, doc_items, field):
        def part(text, items):
            parts = [{"type": "image", "image": it} for it in items]
            if text:
                parts.append({"type": "text", "text": text})
            return parts or [{"type": "text", "text": "NULL"}]

        content = [{"type": "text", "text": f"<Instruct>: {self.instruction}"}, {"type": "text", "text": "<Query>:"}]
        content += part(self.query_text, self.query_items)
        content.append({"type": "text", "text": "\n<Document>:"})
        content += part(doc_text, doc_items)
        messages = [
            {"role": "system", "content": [{"type": "text", "text": VL_RERANK_SYSTEM}]},
            {"role": "user", "content": content},
        ]
        return enc.encode_chat(messages, field)

    def _jina_ids(self, enc, doc_text, doc_items, field):
        def side(text, items):
            return enc.marker * len(items) + text

        prompt = f"**Document**:\n{side(doc_text, doc_items)}\n**Query**:\n{side(self.query_text, self.query_items)}"
        ids = enc.encode_text(prompt, [*doc_items, *self.query_items], field, add_special_tokens=False)
        return ids + [JINA_SCORE_TOKEN_ID]

    def result(self, item, outputs):
        return ScoreResult(score=float(torch.sigmoid(outputs[0][0, 0].double())))

    def failed(self, item, message):
        return ScoreResult(error=message)


class MultimodalEmbedTask(Task[EmbedResult]):
    """Qwen3-VL-Embedding: instruction as the system turn, images then text as the user turn."""

    name = "embed"

    def __init__(self, pooling: Pooling, instruction: str | None, dimensions: int | None, normalize: bool,
                 truncate, side) -> None:
        instruction = (instruction or VL_EMBED_INSTRUCTION).strip()
        if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
            instruction += "."
        self.instruction = instruction
        self.pooling = pooling
        self.dimensions = dimensions
        self.normalize = normalize
        self.truncate, self.side = truncate, side
        self.head = IdentityHead()

    def sequences(self, item, field, enc):
        from ..prompts import is_role_chat, is_token_ids

        if is_token_ids(item) or is_role_chat(item):
            ids = enc.fit(enc.encode(item, field), field, self.truncate, self.side)
        else:
            text, sources = split_item(enc, item, field)
            sources = sources + (enc._pending or [])
            enc._pending = None
            if not text.strip() and not sources:
                raise InvalidRequestError(field, "text is empty")
            ids = fit_document(enc, lambda t: self._chat_ids(enc, t, sources, field), text, self.truncate,
                               self.side, field, "text")
        return [Sequence(ids, self.pooling)]

    def _chat_ids(self, enc, text: str, sources: list[Any], field: str) -> list[int]:
        parts = [{"type": "image", "image": s} for s in sources]
        if text:
            parts.append({"type": "text", "text": text})
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.instruction}]},
            {"role": "user", "content": parts},
        ]
        return enc.encode_chat(messages, field)

    def result(self, item, outputs):
        vec = outputs[0][0]
        if self.dimensions is not None:
            vec = vec[: self.dimensions]
        if self.normalize:
            vec = torch.nn.functional.normalize(vec, dim=-1)
        return EmbedResult(embedding=vec.numpy())

    def failed(self, item, message):
        return EmbedResult(error=message)
