"""Dataset: JSONL chats and instructions -> token ids and an assistant-only loss mask.

Two line forms are accepted (unknown extra fields are ignored):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- instruction: ``{"prompt": "...", "response": "...", "system": "..." (optional)}``

Each line is rendered with the teacher's chat template. ``loss_mask[t] == 1`` marks tokens
written by the assistant (its content and end-of-turn token): those are the tokens the student
learns to predict. Truncation is explicit: ``error`` refuses an over-long sample, ``right``
keeps its first ``max_length`` tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError

ROLES = ("system", "user", "assistant")


@dataclass
class Sample:
    key: str  # unique in the dataset: "<file stem>-<line number>"
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # uint8 [T]; 1 = assistant token (a label the student learns)

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


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object); blank lines are skipped, bad JSON names file and line."""
    if not path.is_file():
        raise DistillError(f"dataset file {path} not found")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistillError(
                    f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise DistillError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
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


def render(tokenizer: Any, messages: list[dict[str, str]], where: str) -> Sample:
    """Render with the chat template; mask the characters each assistant turn adds."""
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
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for lo, hi in spans:
        mask[(starts >= lo) & (starts < hi)] = 1
    return Sample(key="", input_ids=ids, loss_mask=mask)


def sample_key(path: Path, line: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)
    return f"{stem}-{line:07d}"


def tokenize_file(
    path: Path,
    tokenizer: Any,
    max_length: int,
    truncation: str = "error",
    max_samples: int = 0,
    stats: TokenizeStats | None = None,
) -> list[Sample]:
    """Read, validate and tokenize a whole JSONL file (all errors surface before any work)."""
    stats = stats if stats is not None else TokenizeStats()
    samples: list[Sample] = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        s = render(tokenizer, to_messages(obj, where), where)
        s.key = sample_key(path, n)
        if len(s.input_ids) > max_length:
            if truncation == "error":
                raise DistillError(
                    f"{where}: {len(s.input_ids)} tokens > data.max_length={max_length} "
                    '(raise data.max_length, or set data.truncation = "right")'
                )
            s.input_ids, s.loss_mask = s.input_ids[:max_length], s.loss_mask[:max_length]
            stats.truncated += 1
        if s.n_targets == 0:
            raise DistillError(
                f"{where}: no assistant tokens left after truncation to {max_length} tokens "
                "(raise data.max_length or shorten the prompt)"
            )
        stats.samples += 1
        stats.tokens += len(s.input_ids)
        stats.target_tokens += s.n_targets
        samples.append(s)
        if max_samples and len(samples) >= max_samples:
            break
    if not samples:
        raise DistillError(f"{path}: no samples")
    return samples
