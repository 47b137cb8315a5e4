"""Build the small demo dataset in ``data/demo`` from public text that ships offline.

Sources (see ``data/demo/NOTICE.md``):

* chatterbot-corpus English YAML files (BSD-3-Clause) -> chat form
  ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}``.
* Python's ``pydoc_data.topics`` (PSF License) -> instruction form ``{"prompt", "response"}``.

Every line also carries a ``"source"`` field, which consumers ignore. Regenerate with
``python -m distill.demo.dataset`` from the repository root.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError

DEFAULT_OUT_DIR = Path("data/demo")
MAX_TOPICS = 150
MAX_RESPONSE_CHARS = 400

Record = dict[str, Any]

_UNDERLINE = re.compile(r"^([*=\-~^\"'#+])\1+$")
_LIST_ITEM = re.compile(r"^(\d+\.|[*\-+•]|\(\d+\))\s")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)$")
_SKIP_PARAGRAPH = re.compile(
    r"^(New in version|Changed in version|Deprecated since|See also:|Note:|\*\*Source code:\*\*)"
)
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"”')]))\s+")
_SENTENCE_ENDINGS = (".", "!", "?", '."', ".”", ".)", '?"', "?”")
_HYPHEN_BREAK = re.compile(r"(?<=[A-Za-z])-\n[ \t]*(?=[a-z])")


def chatterbot_dir() -> Path:
    """Return the chatterbot-corpus English data folder, found without importing the package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        english = Path(location) / "data" / "english"
        if english.is_dir():
            return english
    raise DistillError(
        "The chatterbot-corpus package is needed to build the demo dataset: "
        "pip install --no-deps chatterbot-corpus"
    )


def source_versions() -> str:
    """Describe the source versions the output depends on (recorded in NOTICE.md)."""
    try:
        corpus = importlib.metadata.version("chatterbot-corpus")
    except importlib.metadata.PackageNotFoundError:
        corpus = "unknown"
    return f"Python {platform.python_version()}, chatterbot-corpus {corpus}"


def _turn_text(value: object) -> str | None:
    """Return a turn as stripped text; numbers become strings, anything else is rejected."""
    if isinstance(value, bool):  # YAML 1.1 turns "yes"/"no" into bools: the text is lost.
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text or None


def chatterbot_records(english_dir: Path) -> Iterator[Record]:
    """Yield chat records from every ``*.yml`` file in ``english_dir``, in sorted file order."""
    for path in sorted(english_dir.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        conversations = data.get("conversations") if isinstance(data, dict) else None
        if not isinstance(conversations, list):
            continue
        for conversation in conversations:
            if not isinstance(conversation, list):
                continue
            turns = [_turn_text(turn) for turn in conversation]
            if not turns or any(turn is None for turn in turns):
                continue
            if len(turns) % 2:  # Drop a trailing user turn that has no answer.
                turns = turns[:-1]
            if not turns:
                continue
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": turn}
                for i, turn in enumerate(turns)
            ]
            yield {"messages": messages, "source": f"chatterbot:{path.stem}"}


def _is_block(paragraph: str) -> bool:
    """True for code, grammar, list items, definition lists, signatures and headings."""
    lines = paragraph.splitlines()
    first = lines[0].strip()
    return (
        lines[0][:1].isspace()
        or bool(_LIST_ITEM.match(first) or _SIGNATURE.match(first))
        or (len(lines) > 1 and all(line[:1].isspace() for line in lines[1:]))
        or any(_UNDERLINE.match(line.strip()) for line in lines)
    )


def _is_indented_prose(paragraph: str) -> bool:
    """True for an indented paragraph that reads as prose (a signature's description)."""
    text = " ".join(paragraph.split())
    return (
        paragraph[:1].isspace()
        and text[:1].isupper()
        and text.endswith((".", ":"))
        and "::=" not in text
    )


def _sentences(text: str) -> list[str]:
    """Split text after ``.``, ``!`` or ``?`` (and closing quotes/brackets) plus whitespace."""
    return [s for s in _SENTENCE_END.split(text) if s]


def _cut(text: str, limit: int) -> str:
    """Keep whole sentences up to ``limit`` chars; cut one long sentence at a word instead."""
    if len(text) <= limit:
        return text
    kept = ""
    for sentence in _sentences(text):
        candidate = f"{kept} {sentence}" if kept else sentence
        if len(candidate) > limit:
            break
        kept = candidate
    return kept or text[: limit - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def _drop_lead_in(paragraph: str, alone: bool) -> str:
    """Remove a trailing sentence that introduces a block left out (``...as follows:``)."""
    if paragraph.endswith(_SENTENCE_ENDINGS):
        return paragraph
    sentences = _sentences(paragraph)
    if len(sentences) > 1:
        return " ".join(sentences[:-1])
    if alone and paragraph.endswith(":"):
        return paragraph[:-1].rstrip() + "."
    return ""


def summarize_topic(text: str, limit: int = MAX_RESPONSE_CHARS) -> str:
    """Return the leading prose of a pydoc topic, whitespace-collapsed and cut to ``limit``.

    Title, grammar and code blocks are skipped; collection stops at the first block or heading
    after some prose, and a dangling lead-in sentence to that block is dropped.
    """
    text = _HYPHEN_BREAK.sub("-", text)  # Re-join words wrapped at a hyphen ("built-\nin").
    paragraphs = [p.rstrip() for p in re.split(r"\n\s*\n", text.strip("\n")) if p.strip()]
    kept: list[str] = []
    indented = False
    for paragraph in paragraphs[1:]:  # paragraphs[0] is the title with its underline.
        prose = " ".join(paragraph.split())
        if _SKIP_PARAGRAPH.match(prose) or _UNDERLINE.match(prose):
            continue
        if _is_indented_prose(paragraph) and (indented or not kept):
            indented = True  # The description under a leading signature line.
        elif indented:
            break
        elif _is_block(paragraph):
            if kept:
                break
            continue
        kept.append(prose)
        if sum(len(p) + 1 for p in kept) > limit:
            break
    if kept:
        kept[-1] = _drop_lead_in(kept[-1], alone=len(kept) == 1)
    return _cut(" ".join(p for p in kept if p), limit)


def pydoc_records(max_topics: int = MAX_TOPICS) -> Iterator[Record]:
    """Yield prompt/response records for up to ``max_topics`` pydoc topics, evenly spaced."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    if len(names) > max_topics:
        step = len(names) / max_topics
        names = [names[int(i * step)] for i in range(max_topics)]
    for name in names:
        response = summarize_topic(topics[name])
        if response:
            yield {
                "prompt": f"Explain the Python topic '{name}' briefly.",
                "response": response,
                "source": f"pydoc:{name}",
            }


def _content_key(record: Record) -> str:
    """Serialize a record without its source, so the same text from two files dedupes."""
    body = {k: v for k, v in record.items() if k != "source"}
    return json.dumps(body, ensure_ascii=False, sort_keys=True)


def _write_jsonl(path: Path, records: list[Record]) -> None:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    path.write_text("".join(lines), encoding="utf-8", newline="\n")


def build_demo_dataset(
    out_dir: Path, *, eval_fraction: float = 0.1, seed: int = 0
) -> dict[str, int]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; return their line counts."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DistillError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    english_dir = chatterbot_dir()
    records: list[Record] = []
    seen: set[str] = set()
    for record in (*chatterbot_records(english_dir), *pydoc_records()):
        key = _content_key(record)
        if key not in seen:
            seen.add(key)
            records.append(record)
    random.Random(seed).shuffle(records)
    n_eval = round(len(records) * eval_fraction)
    eval_records, train_records = records[:n_eval], records[n_eval:]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "train.jsonl", train_records)
    _write_jsonl(out_dir / "eval.jsonl", eval_records)
    return {"train": len(train_records), "eval": len(eval_records)}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``python -m distill.demo.dataset [--out-dir DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = build_demo_dataset(args.out_dir, eval_fraction=args.eval_fraction, seed=args.seed)
    except DistillError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {counts['train']} train / {counts['eval']} eval lines to {args.out_dir}")
    print(f"sources: {source_versions()}")


if __name__ == "__main__":
    main()
