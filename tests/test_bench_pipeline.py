"""The pipeline bench's own pieces: texts of exact token lengths, and the job summary it parses."""

from __future__ import annotations

import sys
from pathlib import Path

from prefillonly.jobs.runner import JobSummary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
from bench.pipeline import make_texts, parse_summary  # noqa: E402


def test_texts_have_exact_token_lengths(qwen_tokenizer):
    texts, lengths = make_texts(qwen_tokenizer, 16, 20, 300, seed=3)
    assert [len(qwen_tokenizer.encode(t)) for t in texts] == lengths
    assert min(lengths) >= 20 and max(lengths) <= 300


def test_summary_line_round_trips():
    s = JobSummary(output="/x", rows=8192, results=8190, errors=2, tokens=4_718_592, wall_s=11.234)
    got = parse_summary("some log line\n" + str(s) + "\n")
    assert got["rows"] == 8192 and got["results"] == 8190 and got["errors"] == 2
    assert got["job_s"] == 11.23
    assert abs(got["rows_per_s"] - s.rows_per_s) < 0.05 and abs(got["tokens_per_s"] - s.tokens_per_s) < 1
