"""The ``prefillonly`` command: a bad argument, file or model is one ``error: ...`` line on stderr
and a non-zero exit, never a traceback; nothing here loads a model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefillonly import cli

ROOT = Path(__file__).parents[1]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a fine film", "id": 1}\n')
    (tmp_path / "bad.yaml").write_text("input: [unclosed\n")
    (tmp_path / "bad.json").write_text('{"input": "in.jsonl", ')
    (tmp_path / "list.json").write_text('["input", "output"]')
    (tmp_path / "rows.jsonl").write_text('{"text": "good", "label": "positive"}\n\n{"text": "bad", "label": "meh"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "good", "label": "positive"}\n{"text": \n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file\n" * 20)
    (tmp_path / "bin.jsonl").write_bytes('{"text": "utf-16"}\n'.encode("utf-16-le"))
    return tmp_path


def _main(args, files, capsys) -> tuple[int, str]:
    args = [a.replace("DIR", str(files)) for a in args]
    code = cli.main(args)
    out = capsys.readouterr()
    assert out.out == ""
    return code, out.err


def _one_error_line(err: str, start: str) -> None:
    assert err.startswith(start), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


RUN = ["run", "--input", "DIR/in.jsonl", "--output", "DIR/out", "--no-progress"]
EMBED = ["--task", "embed", "--prompt", "{text}", "--model", "/nonexistent/model"]


@pytest.mark.parametrize(
    "args, start",
    [
        (["run", "--output", "DIR/out", "--task", "embed", "--prompt", "{text}"], "error: input: required"),
        ([*RUN, "--task", "embed", "--prompt", "{txt}", "--model", "/nonexistent/model"],
         "error: prompt: unknown column 'txt' (did you mean 'text'?)"),
        ([*RUN, "--task", "embed", "--prompt", "{text}", "--model", "/nonexistent/model"],
         "error: model: /nonexistent/model is neither a local directory"),
        ([*RUN, "--task", "embed", "--prompt", "{text}", "--model", "DIR"], "error: model: "),
        (["run", "--input", "DIR/bad.parquet", "--output", "DIR/out", *EMBED],
         "error: input: 'DIR/bad.parquet': is not a readable Parquet file (Parquet magic bytes not found in footer. "
         "Either the file is corrupted or this is not a parquet file.): write or fetch it again, or leave it out of "
         "the input"),
        (["run", "--input", "DIR/bin.jsonl", "--output", "DIR/out", *EMBED],
         "error: input: 'DIR/bin.jsonl': line 1 holds binary data (a NUL byte), so this is not UTF-8 JSON Lines"),
        (["run", "--job", "DIR/bad.yaml"], "error: job_file: "),
        (["run", "--job", "DIR/bad.json"], "error: job_file: "),
        (["run", "--job", "DIR/list.json"], "error: job_file: "),
        (["run", "--job", "DIR/missing.yaml"], "error: job_file: cannot read"),
        (["demo", "--model", "/nonexistent/model", "--no-compare"], "error: model: /nonexistent/model is neither"),
        (["demo", "--model", "/nonexistent/model", "--max-num-batched-tokens", "0"],
         "error: max_num_batched_tokens: must be a positive int; got 0"),
        (["demo", "--data", "DIR/missing.jsonl"], "error: data: cannot read 'DIR/missing.jsonl': No such file"),
        (["demo", "--data", "DIR/rows.jsonl"],
         "error: data: 'DIR/rows.jsonl' line 3: each row needs a string 'text' and a 'label' in ['positive', 'negative']"),
        (["demo", "--data", "DIR/broken.jsonl"], "error: data: 'DIR/broken.jsonl' line 2 is not JSON"),
        (["demo", "--data", "DIR/empty.jsonl"], "error: data: 'DIR/empty.jsonl' has no rows"),
        (["demo", "--limit", "-3"], "error: limit: must be 0 (all rows) or a positive number of rows; got -3"),
    ],
)
def test_bad_arguments_are_one_line(args, start, files, capsys):
    code, err = _main(args, files, capsys)
    assert code == 2
    _one_error_line(err, start.replace("DIR", str(files)))


def test_a_yaml_error_is_folded_onto_one_line(files, capsys):
    code, err = _main(["run", "--job", "DIR/bad.yaml"], files, capsys)
    assert code == 2 and "not valid YAML" in err and "line 1, column 8" in err and "<stream end>" in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--task", "translate"], "argument --task: invalid choice: 'translate'"),
        (["run", "--truncate", "many"], "argument --truncate: invalid int value: 'many'"),
        (["serve"], "argument command: invalid choice: 'serve'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_usage_mistakes_are_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    _one_error_line(err, f"error: {needle}")
    assert "--help" in err


def test_unexpected_failure_is_one_line_unless_debugging(monkeypatch, files, capsys):
    def boom(args):
        raise RuntimeError("pyarrow said no\nat line 2")

    monkeypatch.setattr(cli, "_cmd_run", boom)
    monkeypatch.delenv("PREFILLONLY_DEBUG", raising=False)
    code, err = _main(RUN, files, capsys)
    assert code == 1
    _one_error_line(err, "error: RuntimeError: pyarrow said no at line 2 (PREFILLONLY_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("PREFILLONLY_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(RUN)


def test_the_real_process_prints_no_usage_block(files):
    """Through ``python -m prefillonly``: stderr is exactly one line and the exit code is 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for args, start in [(["run", "--task", "nope"], "error: argument --task: invalid choice: 'nope'"),
                        (["run", "--job", str(files / "bad.json")], "error: job_file: ")]:
        proc = subprocess.run([sys.executable, "-m", "prefillonly", *args], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 2 and proc.stdout == ""
        _one_error_line(proc.stderr, start)
