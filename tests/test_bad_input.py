"""Bad dataset lines end the teacher before any model is loaded or anything is written, or,
with data.on_invalid = "skip", are left out and recorded; the CLI shows one progress display."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distill import models
from distill.config import load_job
from distill.errors import DistillError
from distill.format.manifest import MANIFEST, Manifest
from distill.store.storage import open_store
from distill.teacher.run import run_teacher
from tests.test_pipeline import make_job, stored_keys


def spoil(path: Path, lines: dict[int, bytes]) -> None:
    """Replace the given 1-based lines of a JSONL file with raw bytes."""
    rows = path.read_bytes().splitlines()
    for n, raw in lines.items():
        rows[n - 1] = raw
    path.write_bytes(b"\n".join(rows) + b"\n")


def test_cli_non_utf8_dataset_is_one_line_exit_2_nothing_written(tiny_teacher_dir, tmp_path):
    out = tmp_path / "out"
    job = make_job(tmp_path, tiny_teacher_dir, str(out), n_train=16)
    spoil(
        tmp_path / "train.jsonl", {5: '{"prompt": "caf\u00e9", "response": "x"}'.encode("latin-1")}
    )
    r = subprocess.run(
        [sys.executable, "-m", "distill.cli", "teacher", "--job", str(job)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    error = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(error) == 1 and "train.jsonl:5: not UTF-8 (byte 0xe9 at column 16)" in error[0]
    assert not out.exists()


def test_every_bad_line_is_reported_before_the_model_loads(tiny_teacher_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    job = load_job(make_job(tmp_path, tiny_teacher_dir, str(out), n_train=40))
    spoil(tmp_path / "train.jsonl", {3: b"{oops", 9: b"[1, 2]", 30: b'{"text": "no chat"}'})
    spoil(tmp_path / "eval.jsonl", {2: b"\xff\xfe"})

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the dataset was validated")

    monkeypatch.setattr(models, "load_model", no_model)
    with pytest.raises(DistillError) as e:
        run_teacher(job)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'}: 3 invalid lines:")
    for needle in (
        "train.jsonl:3: malformed JSON",
        "train.jsonl:9: expected a JSON object",
        "train.jsonl:30: expected 'messages'",
    ):
        assert needle in msg
    assert not out.exists()


def test_skip_leaves_bad_lines_out_and_records_them(tiny_teacher_dir, tmp_path, capfd):
    out = tmp_path / "out"
    path = make_job(tmp_path, tiny_teacher_dir, str(out), n_train=40, data__on_invalid='"skip"')
    bad = {3: b"{oops", 9: b"\xe9t\xe9", 30: b'{"prompt": "p", "response": ""}'}
    spoil(tmp_path / "train.jsonl", bad)
    manifests = run_teacher(load_job(path))
    m = manifests["train"]
    assert m.skipped_lines == {"count": 3, "first_lines": [3, 9, 30]}
    assert "train: skipped 3 invalid line(s)" in capfd.readouterr().err
    stored = Manifest.from_json(open_store(str(out / "train")).read_bytes(MANIFEST), "m")
    assert stored.skipped_lines == m.skipped_lines and manifests["eval"].skipped_lines == {}
    n_lines = len((tmp_path / "train.jsonl").read_bytes().splitlines())
    want = [f"train-{i:07d}" for i in range(1, n_lines + 1) if i not in bad]
    assert sorted(stored_keys(str(out / "train"), tmp_path)) == want


def test_cli_shows_no_transformers_progress_bars(tiny_teacher_dir, tmp_path):
    job = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "out"), n_train=16)
    r = subprocess.run(
        [sys.executable, "-m", "distill.cli", "teacher", "--job", str(job)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "teacher train" in r.stderr  # our own progress bar is there
    assert "Loading weights" not in r.stderr and "Writing model shards" not in r.stderr
