"""``prefillonly run`` end to end on a tiny random Qwen3 (real Qwen3 tokenizer), on CPU.

Every job's values are checked against calling the LLM API directly on the same prompts;
bad rows must land in ``_errors/`` with the engine's (or the template's) reason, and
``--data-parallel 2`` must write the same rows as one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobs_fake import read_output, write_jsonl, write_parquet
from tiny_models import TEST_DEVICE

from prefillonly.cli import main

MODEL = "qwen3_untied"  # Qwen3ForCausalLM, hidden 32, 2 layers, vocab 151669
MAX_LEN = 192
N = 240
ROWS_PER_SHARD = 64
BATCH_ROWS = 32
LABELS = ["positive", "negative"]
QUERY = "Which review says the product is good?"
EMPTY, LONG, NULL = 7, 150, 201  # the rows that must fail

_WORDS = [
    "the", "product", "works", "well", "and", "the", "battery", "lasts", "long", "but", "the", "screen", "is",
    "dim", "shipping", "was", "slow", "support", "never", "answered", "I", "would", "buy", "it", "again", "great",
    "value", "terrible",
]


def make_rows() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        n = int(rng.integers(2, 30))
        rows.append({"id": f"doc-{i}", "text": " ".join(rng.choice(_WORDS, n))})
    rows[EMPTY]["text"] = ""  # "{text}" fills to an empty prompt
    rows[LONG]["text"] = " ".join(["long"] * 400)  # over --max-model-len, no --truncate
    rows[NULL]["text"] = None  # the template cannot be filled
    return rows


ROWS = make_rows()
EXPECTED_ERRORS = {EMPTY, LONG, NULL}


@pytest.fixture(scope="module")
def model_dir(tiny_path) -> str:
    return str(tiny_path(MODEL))


@pytest.fixture(scope="module")
def llm(tiny_llm):
    return tiny_llm(MODEL, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("engine_jobs")
    write_jsonl(d / "in.jsonl", ROWS)
    return d


def base_args(data_dir: Path, out: Path, model_dir: str) -> list[str]:
    return [
        "run", "--input", str(data_dir / "in.jsonl"), "--output", str(out), "--prompt", "{text}",
        "--model", model_dir, "--device", TEST_DEVICE, "--dtype", "float32", "--max-model-len", str(MAX_LEN),
        "--rows-per-shard", str(ROWS_PER_SHARD), "--batch-rows", str(BATCH_ROWS), "--no-progress",
    ]


TASK_ARGS = {
    "classify": ["--task", "classify", "--labels", *LABELS],
    "classify_truncate": ["--task", "classify", "--labels", *LABELS, "--truncate", "24"],
    "score": ["--task", "score", "--query", QUERY],
    "embed": ["--task", "embed", "--dimensions", "16"],
    "next_token": ["--task", "next_token", "--top-k", "3"],
}


def reference(llm, name: str, prompts: list[str]) -> list[Any]:
    """The LLM API's own answers for the same prompts."""
    if name == "classify":
        return llm.classify(prompts, labels=LABELS)
    if name == "classify_truncate":
        return llm.classify(prompts, labels=LABELS, truncate=24)
    if name == "score":
        return llm.score(QUERY, prompts)
    if name == "embed":
        return llm.embed(prompts, dimensions=16)
    return llm.next_token(prompts, top_k=3)


# The job's steps hold other rows than the API call's: bit-equal on the CPU, while on a GPU float32 GEMMs of
# other shapes round differently.
API_TOL = 1e-6 if TEST_DEVICE == "cpu" else 1e-5


def check_row(name: str, row: dict[str, Any], ref: Any) -> None:
    if name.startswith("classify"):
        assert row["label"] == ref.label
        assert row["probs"].keys() == ref.probs.keys()
        for label, p in ref.probs.items():
            assert abs(row["probs"][label] - p) < API_TOL
    elif name == "score":
        assert abs(row["score"] - ref.score) < API_TOL
    elif name == "embed":
        assert len(row["embedding"]) == 16
        np.testing.assert_allclose(row["embedding"], ref.embedding, rtol=0, atol=API_TOL)
    else:
        assert (row["token_id"], row["token"]) == (ref.token_id, ref.token)
        assert abs(row["logprob"] - ref.logprob) < API_TOL
        assert [t["token_id"] for t in row["top_logprobs"]] == [t.token_id for t in ref.top_logprobs]
        for got, want in zip(row["top_logprobs"], ref.top_logprobs):
            assert got["token"] == want.token and abs(got["logprob"] - want.logprob) < API_TOL


def strip_index(reason: str) -> str:
    return reason.split(": ", 1)[1] if reason.startswith(("prompts[", "documents[", "texts[")) else reason


def check_against_api(llm, name: str, out: Path, rows: list[dict[str, Any]] = ROWS, ids=lambda i: f"doc-{i}"):
    results, errors = read_output(out)
    assert len(results) + len(errors) == len(rows)
    positions = [i for i, r in enumerate(rows) if r["text"] is not None]
    refs = dict(zip(positions, reference(llm, name, [rows[i]["text"] for i in positions])))
    expected_errors = {i for i, ref in refs.items() if ref.error is not None} | {NULL}
    assert {e["position"] for e in errors.values()} == expected_errors
    for rec in errors.values():
        i = rec["position"]
        assert rec["id"] == ids(i) and rec["row_index"] == i and rec["file"]
        want = "column 'text' is null; the prompt template needs it" if i == NULL else strip_index(refs[i].error)
        assert rec["reason"] == want
    for row_id, row in results.items():
        i = row["position"]
        assert row_id == ids(i)
        check_row(name, row, refs[i])
    return results, errors


@pytest.fixture(scope="module")
def single(data_dir, model_dir, tmp_path_factory):
    """single(name) -> output dir of the single-process CLI run of that task (run once per module)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(f"out_{name}") / "out"
            assert main(base_args(data_dir, out, model_dir) + TASK_ARGS[name]) == 0
            done[name] = out
        return done[name]

    return get


@pytest.mark.parametrize("name", list(TASK_ARGS))
def test_cli_task_matches_llm_api(name, single, llm):
    out = single(name)
    results, errors = check_against_api(llm, name, out)
    if name == "classify_truncate":  # cut to 24 tokens, the long row is answered
        assert LONG in {r["position"] for r in results.values()}
    else:
        assert {e["position"] for e in errors.values()} == EXPECTED_ERRORS
        reasons = {e["position"]: e["reason"] for e in errors.values()}
        assert "is empty" in reasons[EMPTY]
        assert f"exceed max_model_len={MAX_LEN}" in reasons[LONG] and "truncate" in reasons[LONG]
    # The directory reads as one dataset with the documented column types.
    table = pq.read_table(out)
    assert table.num_rows == len(results)
    types = dict(zip(table.schema.names, table.schema.types))
    assert types["position"] == pa.int64() and types["id"] == pa.string()
    if name == "embed":
        assert types["embedding"] == pa.list_(pa.float32(), 16)
    if name.startswith("classify"):
        assert pa.types.is_struct(types["probs"]) and [f.name for f in types["probs"]] == LABELS
    shards = sorted(n for n in os.listdir(out) if n.startswith("part-"))
    assert shards == [f"part-{k:06d}.parquet" for k in range(-(-N // ROWS_PER_SHARD))]


def sorted_rows(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    results, errors = read_output(out)
    key = lambda r: r["position"]
    return sorted(results.values(), key=key), sorted(errors.values(), key=key)


def assert_same_output(a: Path, b: Path) -> None:
    """Same rows, ids, positions and error records; floats within 1e-6."""
    (ra, ea), (rb, eb) = sorted_rows(a), sorted_rows(b)
    assert ea == eb
    assert [(r["id"], r["position"]) for r in ra] == [(r["id"], r["position"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if k == "probs":
                assert x[k].keys() == y[k].keys()
                assert max(abs(x[k][label] - y[k][label]) for label in x[k]) < 1e-6
            elif isinstance(x[k], float):
                assert abs(x[k] - y[k]) < 1e-6
            elif k == "embedding":
                np.testing.assert_allclose(x[k], y[k], rtol=0, atol=1e-6)
            else:
                assert x[k] == y[k], k


def test_data_parallel_matches_single_process(single, data_dir, model_dir, tmp_path):
    out = tmp_path / "dp"
    assert main(base_args(data_dir, out, model_dir) + TASK_ARGS["classify"] + ["--data-parallel", "2"]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(single("classify")))
    assert_same_output(single("classify"), out)


def test_job_file_subprocess_and_in_process(llm, model_dir, tmp_path):
    """A YAML job file (relative paths resolved from its folder), run as ``python -m prefillonly run``
    and in-process with flags overriding fields; input without ids, so ids are row positions."""
    rows = [{"text": r["text"]} for r in ROWS]
    write_parquet(tmp_path / "data" / "in.parquet", rows, row_group_size=50)
    job = tmp_path / "job.yaml"
    job.write_text(
        "input: data/in.parquet\n"
        "output: out\n"
        "task: embed\n"
        "prompt: '{text}'\n"
        "task_options: {dimensions: 16}\n"
        f"model: {json.dumps(model_dir)}\n"
        f"engine: {{device: {TEST_DEVICE}, dtype: float32, max_model_len: {MAX_LEN}}}\n"
        f"rows_per_shard: {ROWS_PER_SHARD}\n"
        f"batch_rows: {BATCH_ROWS}\n"
    )
    root = str(Path(__file__).parents[2])  # the checkout, in case the package is not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "prefillonly", "run", "--job", str(job), "--no-progress"],
        cwd=tmp_path / "data", env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{N} rows ({N - 3} results, 3 errors)" in proc.stdout
    check_against_api(llm, "embed", tmp_path / "out", rows, ids=lambda i: i)

    out2 = tmp_path / "out_jsonl"
    assert main(["run", "--job", str(job), "--output", str(out2), "--output-format", "jsonl", "--no-progress"]) == 0
    assert min(n for n in os.listdir(out2) if n.startswith("part-")) == "part-000000.jsonl"
    check_against_api(llm, "embed", out2, rows, ids=lambda i: i)
    assert_same_output(tmp_path / "out", out2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output", "OUT", "--task", "classify", "--prompt", "{text}", "--labels", "a", "b"], "error: input: required"),
        (["--input", "IN", "--output", "OUT", "--task", "classify", "--prompt", "{text}"],
         "error: task_options.labels: classify needs a list of labels"),
        (["--input", "IN", "--output", "OUT", "--task", "score", "--prompt", "{text}"],
         "error: task_options.query: score needs a query string"),
        (["--input", "IN", "--output", "OUT", "--task", "classify", "--prompt", "{text}", "--labels", "a", "b",
          "--dimensions", "8"], "error: task_options.dimensions: is not an option of classify"),
        (["--input", "IN", "--output", "OUT", "--task", "score", "--prompt", "{text}", "--data-parallel", "2"],
         "error: task_options.query: score needs a query string"),
        (["--input", "IN", "--output", "OUT", "--task", "embed", "--prompt", "{text}", "--truncate", "0", "--ray"],
         "error: task_options.truncate: must be a positive int"),
        (["--input", "IN", "--output", "OUT", "--task", "embed", "--prompt", "{text}", "--model", "/nonexistent/model"],
         "error: model: /nonexistent/model is neither a local directory"),
        (["--input", "IN", "--output", "OUT", "--task", "embed", "--prompt", "{txt}"],
         "error: prompt: unknown column 'txt' (did you mean 'text'?)"),
    ],
)
def test_cli_errors_are_one_line(args, message, data_dir, tmp_path, capsys):
    """Bad flags exit with 2 and ``error: field: message``, before any model loads (the model
    below does not exist, so reaching it would be a different error)."""
    args = [str(data_dir / "in.jsonl") if a == "IN" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    if "--model" not in args:
        args += ["--model", "/nonexistent/model"]
    assert main(["run", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert "Traceback" not in err and err.count("\n") == 1


def test_job_file_unknown_option_is_named(data_dir, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {data_dir / 'in.jsonl'}\noutput: out\ntask: embed\nprompt: '{{text}}'\n"
                   "task_options: {dimension: 8}\nmodel: /nonexistent/model\n")
    assert main(["run", "--job", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task_options.dimension: is not an option of embed (did you mean 'dimensions'?)")
