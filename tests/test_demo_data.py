"""Tests for the demo dataset builder and the committed ``data/demo`` files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.demo import dataset as demo_data
from distill.demo.dataset import build_demo_dataset, source_versions, summarize_topic
from distill.errors import DistillError

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
FILES = ("train.jsonl", "eval.jsonl")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_demo_dataset(out)
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _check_record(line: str) -> None:
    record = json.loads(line)
    assert isinstance(record, dict)
    assert isinstance(record.get("source"), str) and record["source"]
    if "messages" in record:
        messages = record["messages"]
        assert isinstance(messages, list) and len(messages) >= 2
        for i, message in enumerate(messages):
            assert message["role"] == ("user" if i % 2 == 0 else "assistant")
            assert isinstance(message["content"], str) and message["content"].strip()
        assert messages[-1]["role"] == "assistant"
    else:
        for key in ("prompt", "response"):
            assert isinstance(record.get(key), str) and record[key].strip()


def test_deterministic(built: Path, tmp_path: Path) -> None:
    counts = build_demo_dataset(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes()
    assert counts == {name.split(".")[0]: len(_lines(built / name)) for name in FILES}


def test_seed_changes_order_not_content(built: Path, tmp_path: Path) -> None:
    build_demo_dataset(tmp_path, seed=1)
    ours = set(_lines(tmp_path / "train.jsonl") + _lines(tmp_path / "eval.jsonl"))
    base = set(_lines(built / "train.jsonl") + _lines(built / "eval.jsonl"))
    assert ours == base
    assert _lines(tmp_path / "eval.jsonl") != _lines(built / "eval.jsonl")


def test_committed_files_match_regeneration(built: Path) -> None:
    notice = (DEMO_DIR / "NOTICE.md").read_text(encoding="utf-8")
    if f"Generated with: {source_versions()}" not in notice:
        pytest.skip(f"data/demo was generated with other source versions than {source_versions()}")
    for name in FILES:
        assert (DEMO_DIR / name).read_bytes() == (built / name).read_bytes(), (
            f"data/demo/{name} drifted: rerun `python -m distill.demo.dataset`"
        )


@pytest.mark.parametrize("root", ["built", "committed"])
def test_lines_are_valid_and_split_disjoint(root: str, built: Path) -> None:
    folder = built if root == "built" else DEMO_DIR
    train, evals = (_lines(folder / name) for name in FILES)
    assert train and evals
    for line in train + evals:
        _check_record(line)
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)
    sources = {json.loads(line)["source"].split(":")[0] for line in train + evals}
    assert sources == {"chatterbot", "pydoc"}


def test_demo_files_are_small() -> None:
    assert sum((DEMO_DIR / name).stat().st_size for name in FILES) < 1_000_000


def test_eval_fraction(tmp_path: Path) -> None:
    counts = build_demo_dataset(tmp_path, eval_fraction=0.25, seed=3)
    total = counts["train"] + counts["eval"]
    assert counts["eval"] == round(total * 0.25)
    with pytest.raises(DistillError):
        build_demo_dataset(tmp_path, eval_fraction=1.0)


def test_missing_corpus_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(demo_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DistillError, match="pip install --no-deps chatterbot-corpus"):
        build_demo_dataset(tmp_path)


def test_chatterbot_turn_handling(tmp_path: Path) -> None:
    (tmp_path / "x.yml").write_text(
        "conversations:\n"
        "- [Hi, Hello, dangling]\n"  # odd trailing user turn is dropped
        "- [How many, 42]\n"  # numbers become strings
        "- [Bad, {a: 1}]\n"  # dicts are skipped
        "- [Empty, '  ']\n"  # empty turns are skipped
        "- only a string\n"
        "- [Lonely]\n",
        encoding="utf-8",
    )
    records = list(demo_data.chatterbot_records(tmp_path))
    assert [[m["content"] for m in r["messages"]] for r in records] == [
        ["Hi", "Hello"],
        ["How many", "42"],
    ]
    assert {r["source"] for r in records} == {"chatterbot:x"}


def test_summarize_topic_cuts_at_sentence() -> None:
    text = (
        "Title\n*****\n\n"
        + " ".join(f"Sentence number {i} is here." for i in range(40))
        + "\n\n   code ::= block\n"
    )
    summary = summarize_topic(text)
    assert 0 < len(summary) <= demo_data.MAX_RESPONSE_CHARS
    assert summary.endswith("is here.")
    lead_in = "Title\n*****\n\nFirst sentence. The syntax is:\n\n   x ::= y\n"
    assert summarize_topic(lead_in) == "First sentence."
