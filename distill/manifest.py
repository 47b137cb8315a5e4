"""The manifest: written last, it marks a shard set complete and describes how to read it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from distill.errors import DistillError
from distill.shards import ShardStats

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    split: str
    teacher: str  # the job's model reference
    teacher_config_sha256: str
    tokenizer_fingerprint: str
    vocab_size: int
    target_kind: str
    k: int
    dtypes: dict[str, str]
    max_length: int
    job_fingerprint: str
    shards: list[ShardStats]
    teacher_seconds: float = 0.0
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def target_tokens(self) -> int:
        return sum(s.target_tokens for s in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
        except json.JSONDecodeError as e:
            raise DistillError(f"{where}: manifest is not valid JSON ({e})") from None
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DistillError(
                f"{where}: manifest schema version {version!r} is not supported by this "
                f"distill (knows {SCHEMA_VERSION}); upgrade distill or re-run the teacher"
            )
        try:
            raw["shards"] = [ShardStats(**s) for s in raw["shards"]]
            return cls(**raw)
        except TypeError as e:
            raise DistillError(f"{where}: malformed manifest ({e})") from None
