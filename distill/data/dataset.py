"""Dataset: JSONL chats and instructions -> token ids and an assistant-only loss mask.

Two line forms are accepted (unknown extra fields are ignored):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- instruction: ``{"prompt": "...", "response": "...", "system": "..." (optional)}``

Each line is rendered with the teacher's chat template. ``loss_mask[t] == 1`` marks tokens
written by the assistant (its content and end-of-turn token): those are the tokens the student
learns to predict. Truncation is explicit: ``error`` refuses an over-long sample, ``right``
keeps its first ``max_length`` tokens.

Invalid lines (not UTF-8, malformed JSON, a wrong shape, nothing to learn) are all found before
any model is loaded: ``on_invalid = "error"`` refuses the file and lists every bad line (the
first :data:`MAX_REPORTED`, then a count); ``"skip"`` leaves them out and counts them. Sample
keys stay line-based either way, so skipping a line never renames another sample.

This module holds the one-sample pieces (:func:`render` is the reference); files in every
format, the shard rule and the batched, multi-process tokenising are
:mod:`~distill.data.records`, :mod:`~distill.data.prepare` and :mod:`~distill.data.encode`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError

ROLES = ("system", "user", "assistant")
ON_INVALID = ("error", "skip")
MAX_REPORTED = 20  # bad lines listed in an error or a manifest; the rest are counted


@dataclass
class Sample:
    key: str  # unique in the dataset: "<file stem>-<line number>"
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # uint8 [T]; 1 = assistant token (a label the student learns)
    # targets.alignment: the tokens' character offsets [T, 2] and the assistant contents'
    # character spans [turns, 2] in the rendered text (int32), else None
    offsets: np.ndarray | None = None
    content: np.ndarray | None = None

    @property
    def n_targets(self) -> int:
        """Positions t whose next token t+1 is an assistant token."""
        return int(self.loss_mask[1:].sum())


@dataclass
class TokenizeStats:
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    invalid: int = 0  # lines left out (on_invalid = "skip")
    invalid_lines: list[int] = field(default_factory=list)  # the first MAX_REPORTED of them

    def invalid_info(self) -> dict[str, Any]:
        """What the manifest records of skipped lines (empty when none were skipped)."""
        return {"count": self.invalid, "first_lines": self.invalid_lines} if self.invalid else {}


class LineError(DistillError):
    """One dataset line is invalid; the message starts with ``file:line:``."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def list_bad_lines(path: Path, errors: list[LineError]) -> str:
    """One message for every bad line of a file: the first MAX_REPORTED, then a count.

    A single bad line stays a one-line message."""
    hint = 'data.on_invalid = "skip" leaves invalid lines out'
    if len(errors) == 1:
        return f"{errors[0]} ({hint})"
    shown = "\n".join(f"  {e}" for e in errors[:MAX_REPORTED])
    more = len(errors) - MAX_REPORTED
    return (
        f"{path}: {len(errors)} invalid lines:\n{shown}"
        + (f"\n  ... and {more} more" if more > 0 else "")
        + f"\n(fix them; {hint})"
    )


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | LineError]]:
    """Yield (line number, object or the line's error); blank lines are skipped.

    Lines are decoded one by one, so a non-UTF-8 line names its own line and byte.
    """
    if not path.is_file():
        raise DistillError(f"dataset file {path} not found")
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte, col = raw[e.start], e.start + 1
                msg = f"{path}:{n}: not UTF-8 (byte 0x{byte:02x} at column {col}); "
                yield n, LineError(msg + "re-save the file as UTF-8", n)
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, LineError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})", n)
                continue
            if not isinstance(obj, dict):
                where, kind = f"{path}:{n}", type(obj).__name__
                obj = LineError(f"{where}: expected a JSON object, got {kind}", n)
            yield n, obj


def to_messages(obj: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Normalise a chat or instruction line to a message list, validating roles and content."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DistillError(f"{where}: 'messages' must be a non-empty list")
    elif "prompt" in obj or "response" in obj:
        for k in ("prompt", "response"):
            if not isinstance(obj.get(k), str):
                raise DistillError(f"{where}: instruction form needs string '{k}'")
        msgs = [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["response"]},
        ]
        if isinstance(obj.get("system"), str):
            msgs.insert(0, {"role": "system", "content": obj["system"]})
    else:
        raise DistillError(f"{where}: expected 'messages' (chat) or 'prompt'/'response' fields")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DistillError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DistillError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DistillError(f"{where}: no assistant turn with content (nothing to learn)")
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], gen_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text of ``messages`` and the character spans each assistant turn
    adds (its content and end-of-turn token)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DistillError("the teacher's tokenizer has no chat template; cannot render chats")
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise DistillError(
                f"{where}: the chat template does not render turns as a prefix of the whole "
                "conversation; cannot locate assistant tokens"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def render(tokenizer: Any, messages: list[dict[str, str]], where: str) -> Sample:
    """Render with the chat template; mask the characters each assistant turn adds (one
    sample; :mod:`distill.data.encode` does the same for a block of samples at once)."""
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for lo, hi in spans:
        mask[(starts >= lo) & (starts < hi)] = 1
    return Sample(key="", input_ids=ids, loss_mask=mask)


def key(stem: str, line: int) -> str:
    """A sample's key: ``<file stem>-<line or row number>``."""
    return f"{stem}-{line:07d}"


def tokenize_file(
    path: Path,
    tokenizer: Any,
    max_length: int,
    truncation: str = "error",
    max_samples: int = 0,
    stats: TokenizeStats | None = None,
    on_invalid: str = "error",
    workers: int = 0,
) -> list[Sample]:
    """Read, validate and tokenize a whole JSONL (or ``.gz``, ``.zst``, Parquet) file; all
    errors surface before any work. ``workers``: processes (default: every core for a large
    file; :mod:`distill.data.prepare`)."""
    from distill.data.prepare import Rules, tokenize_files
    from distill.data.records import DataFile

    rules = Rules(max_length, truncation, max_samples, on_invalid)
    f = DataFile(Path(path).name, Path(path), str(path))
    return tokenize_files([f], str(path), tokenizer, rules, stats, workers)
