"""The runner's ``prepare`` stage: run one batch ahead in the reader thread, its state handed
to the processor; the engine processor tokenises there, and outputs stay exactly those of
the API; a crash in ``prepare`` is resumed exactly once like any other."""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

import pytest
from jobs_fake import FakeProcessor, read_output, text_for, write_jsonl, write_parquet

from prefillonly.jobs import JobSpec, run_job
from prefillonly.jobs.engine_processor import EngineProcessor
from prefillonly.prompts import TokenCache

N = 600
ROWS = [{"id": f"d{i}", "text": text_for(i) if i % 50 else ""} for i in range(N)]


def make_spec(input_path, out, **kw) -> JobSpec:
    base = {"input": str(input_path), "output": str(out), "task": "classify", "prompt": "{text}",
            "task_options": {"labels": ["positive", "negative", "neutral"]}, "rows_per_shard": 128,
            "batch_rows": 50, "max_buffered_rows": 100}
    return JobSpec(**{**base, **kw})


class Preparing(FakeProcessor):
    """Records where ``prepare`` ran and checks each call gets the state of its own batch."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.prepare_threads: set[str] = set()
        self.prepared = 0
        self.crash_at = crash_at

    def prepare(self, requests: list[dict[str, Any]]) -> tuple[int, ...]:
        self.prepare_threads.add(threading.current_thread().name)
        self.prepared += 1
        if self.prepared == self.crash_at:
            raise RuntimeError("tokenizer died")
        return tuple(r["position"] for r in requests)

    def __call__(self, requests, state=None):  # type: ignore[override]
        assert state == tuple(r["position"] for r in requests)
        return super().__call__(requests)


def test_prepare_runs_in_reader_thread_with_same_output(tmp_path):
    src = write_parquet(tmp_path / "in.parquet", ROWS, row_group_size=70)
    run_job(make_spec(src, tmp_path / "ref"), FakeProcessor(), progress=False)
    proc = Preparing()
    summary = run_job(make_spec(src, tmp_path / "out"), proc, progress=False)
    assert proc.prepare_threads == {"prefillonly-job-reader"}
    assert proc.prepared == proc.calls == -(-N // 50)
    assert summary.rows == N
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")
    inline = Preparing()  # without prefetch the stage runs in the caller's thread
    run_job(make_spec(src, tmp_path / "inline"), inline, progress=False, prefetch=False)
    assert inline.prepare_threads == {threading.current_thread().name}
    assert read_output(tmp_path / "inline") == read_output(tmp_path / "ref")


@pytest.mark.parametrize("crash_at", [1, 6])
def test_crash_in_prepare_then_resume_exactly_once(tmp_path, crash_at):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    run_job(make_spec(src, tmp_path / "ref"), FakeProcessor(), progress=False)
    spec = make_spec(src, tmp_path / "out")
    with pytest.raises(RuntimeError, match="tokenizer died"):
        run_job(spec, Preparing(crash_at=crash_at), progress=False)
    assert not [n for n in os.listdir(spec.output) if n.endswith(".tmp")]
    proc = Preparing()
    summary = run_job(spec, proc, progress=False)
    assert summary.rows + summary.rows_skipped == N
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")


CHAT_ROWS = [
    {"id": i, "messages": json.dumps([{"role": "user", "content": f"Review {i}: {text_for(i)}. Positive?"}])}
    for i in range(40)
]
CHAT_ROWS[5]["messages"] = json.dumps([{"role": "user"}])  # no content: the engine's error for this row
TEXT_ROWS = [{"id": i, "text": text_for(i) if i % 9 else " "} for i in range(40)]


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_engine_processor_tokenises_in_prepare(tiny_llm, tmp_path, kind, monkeypatch):
    """Prompts are tokenised in ``prepare`` (never one by one in the engine call), and each
    row's result or error is exactly the API's."""
    llm = tiny_llm("qwen3_untied", max_model_len=192)
    if kind == "text":
        src = write_jsonl(tmp_path / "in.jsonl", TEXT_ROWS)
        spec = make_spec(src, tmp_path / "out", task_options={"labels": ["yes", "no"]}, batch_rows=16)
        prompts: list[Any] = [r["text"] for r in TEXT_ROWS]
    else:
        src = write_jsonl(tmp_path / "in.jsonl", CHAT_ROWS)
        spec = make_spec(src, tmp_path / "out", prompt=None, messages_column="messages",
                         task_options={"labels": ["yes", "no"]}, batch_rows=16)
        prompts = [json.loads(r["messages"]) for r in CHAT_ROWS]
    want = llm.classify(prompts, labels=["yes", "no"])
    processor = EngineProcessor(llm, spec)
    caches: list[TokenCache | None] = []
    real_prepare = processor.prepare
    monkeypatch.setattr(processor, "prepare", lambda reqs: caches.append(real_prepare(reqs)) or caches[-1])
    encoded: list[str] = []
    real_encode = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode", lambda text, **kw: encoded.append(text) or real_encode(text, **kw))
    run_job(spec, processor, progress=False)
    monkeypatch.undo()
    assert len(caches) == 3 and all(c is not None and len(c) > 0 for c in caches)
    assert [t for t in encoded if "Review" in t or "says" in t] == []
    results, errors = read_output(tmp_path / "out")
    for i, ref in enumerate(want):
        if ref.error is not None:
            # a chat's message is named within the row: prompts[5][0].content -> messages[0].content
            reason = ref.error.split(": ", 1)[1] if kind == "text" else re.sub(r"^prompts\[\d+\]", "messages", ref.error)
            assert errors[i]["reason"] == reason
        else:
            assert results[i]["label"] == ref.label
            assert results[i]["probs"] == pytest.approx(ref.probs, abs=1e-6)
    assert len(errors) == (5 if kind == "text" else 1)
    if kind == "chat":  # the row's own message is named, not the call's batch index
        assert errors[5]["reason"] == "messages[0].content: is missing; give every message a content, a string"
