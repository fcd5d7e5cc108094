from __future__ import annotations

import json

import pytest

from prefillonly.errors import InvalidRequestError
from prefillonly.jobs import JobSpec
from prefillonly.jobs.template import FillError, Template

BASE = {
    "input": "in.jsonl",
    "output": "out",
    "task": "classify",
    "prompt": "Review: {text}",
    "task_options": {"labels": ["a", "b"]},
}


def test_defaults():
    spec = JobSpec(**BASE)
    assert spec.output_format == "parquet"
    assert spec.rows_per_shard == 10_000 and spec.batch_rows == 1024
    assert spec.id_column is None
    assert spec.needed_columns() == ["text", "id"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"task": "summarize"}, "task"),
        ({"output_format": "csv"}, "output_format"),
        ({"input_format": "xml"}, "input_format"),
        ({"prompt": None}, "prompt"),
        ({"messages_column": "messages"}, "prompt"),  # both given
        ({"prompt": "no fields"}, "prompt"),
        ({"prompt": "{}"}, "prompt"),
        ({"prompt": "{text"}, "prompt"),
        ({"rows_per_shard": 0}, "rows_per_shard"),
        ({"batch_rows": "8"}, "batch_rows"),
        ({"batch_rows": 2048, "max_buffered_rows": 1024}, "max_buffered_rows"),
        ({"task_options": {}}, "task_options.labels"),
        ({"task_options": {"labels": ["a", "a"]}}, "task_options.labels"),
        ({"task": "embed", "task_options": {"dimensions": -1}}, "task_options.dimensions"),
        ({"task": "embed", "task_options": {"normalize": "yes"}}, "task_options.normalize"),
        ({"task": "next_token", "task_options": {"top_k": 0}}, "task_options.top_k"),
        ({"image_columns": [""]}, "image_columns"),
    ],
)
def test_validation_names_the_field(change, field):
    with pytest.raises(InvalidRequestError) as e:
        JobSpec(**{**BASE, **change})
    assert e.value.field == field, str(e.value)


def test_fixed_prompt_allowed_with_images():
    spec = JobSpec(**{**BASE, "prompt": "Describe the image.", "image_columns": "img"})
    assert spec.image_columns == ["img"]


def test_check_columns_lists_available():
    spec = JobSpec(**{**BASE, "prompt": "{title}: {txet}"})
    with pytest.raises(InvalidRequestError) as e:
        spec.check_columns(["id", "title", "text"])
    msg = str(e.value)
    assert e.value.field == "prompt"
    assert "'txet'" in msg and "did you mean 'text'" in msg and "id, title, text" in msg
    with pytest.raises(InvalidRequestError) as e:
        JobSpec(**{**BASE, "id_column": "doc_id"}).check_columns(["text"])
    assert e.value.field == "id_column"
    JobSpec(**BASE).check_columns(["text"])  # the default id column may be absent


def test_from_file_json_yaml_and_overrides(tmp_path):
    (tmp_path / "jobs").mkdir()
    job = {**BASE, "input": "data/in.jsonl", "task_options": {"labels": ["a", "b"], "instruction": "x"}}
    jpath = tmp_path / "jobs" / "job.json"
    jpath.write_text(json.dumps(job))
    spec = JobSpec.from_file(jpath, output="/abs/out", batch_rows=None, task_options={"instruction": "y"})
    assert spec.input == str(tmp_path / "jobs" / "data/in.jsonl")  # relative to the job file
    assert spec.output == "/abs/out"
    assert spec.batch_rows == 1024  # None overrides are ignored
    assert spec.task_options == {"labels": ["a", "b"], "instruction": "y"}  # merged

    ypath = tmp_path / "job.yaml"
    ypath.write_text(
        "input: in.csv\noutput: out\ntask: score\nprompt: 'Q: {question}'\ntask_options:\n  query: relevant?\nrows_per_shard: 50\n"
    )
    spec = JobSpec.from_file(ypath)
    assert spec.task == "score" and spec.rows_per_shard == 50 and spec.task_options == {"query": "relevant?"}


def test_from_file_errors(tmp_path):
    with pytest.raises(InvalidRequestError) as e:
        JobSpec.from_file(tmp_path / "missing.json")
    assert e.value.field == "job_file"
    p = tmp_path / "job.json"
    p.write_text(json.dumps({**BASE, "promt": "x"}))
    with pytest.raises(InvalidRequestError) as e:
        JobSpec.from_file(p)
    assert e.value.field == "promt" and "did you mean 'prompt'" in str(e.value)
    p.write_text("{not json")
    with pytest.raises(InvalidRequestError) as e:
        JobSpec.from_file(p)
    assert e.value.field == "job_file"


def test_template_fill():
    t = Template("A {x} {{literal}} {y:.1f} {my col}")
    assert t.columns == ["x", "y", "my col"]
    assert t.fill({"x": "hi", "y": 2, "my col": 3}) == "A hi {literal} 2.0 3"
    with pytest.raises(FillError, match="missing column 'x'"):
        t.fill({"y": 1, "my col": 1})
    with pytest.raises(FillError, match="'y' is null"):
        t.fill({"x": 1, "y": None, "my col": 1})
