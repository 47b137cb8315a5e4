"""The manifest: written last, it marks a shard set complete and describes how to read it.

``codec`` names the member codec and its settings (``{"name": "packed", "version": 2, ...}``,
see :mod:`distill.format.codec`); manifests written before codecs existed have none and read as
``npz`` v0. ``targets`` holds what the losses need about the target kind (``kind``, its
parameters, ``sampling`` for sampled kinds (absent before it existed: ``iid``), ``tail``:
whether a tail bucket ``1 - sum p`` applies, ``width``; see :mod:`distill.teacher.extract`); older
manifests get ``topk`` with ``k``. ``width`` is the number of columns of the decoded
``target_*`` arrays (top-k entries, or the unique sampled ids with their counts).

Schema 2 names the stored entries for what they are (``width``, ``target_ids``,
``target_logprobs``, ``target_counts``); schema 1 manifests (``k``, ``topk_*``) are read with
those names mapped. A codec name or version this distill does not know is refused on load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from distill.errors import DistillError
from distill.format.codec import Codec
from distill.format.shards import ShardStats

SCHEMA_VERSION = 2
READS = (1, 2)
# schema 1 -> 2: the entries' names (sampled entries are not a top-k)
_V1_DTYPES = {
    "topk_ids": "target_ids",
    "topk_logprobs": "target_logprobs",
    "topk_counts": "target_counts",
}
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    split: str
    teacher: str  # the job's model reference
    teacher_config_sha256: str
    tokenizer_fingerprint: str
    vocab_size: int
    target_kind: str
    width: int  # columns of the decoded [N, width] target arrays
    dtypes: dict[str, str]
    max_length: int
    job_fingerprint: str
    shards: list[ShardStats]
    teacher_seconds: float = 0.0
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    codec: dict[str, Any] = field(default_factory=lambda: {"name": "npz", "version": 0})
    targets: dict[str, Any] = field(default_factory=dict)
    # dataset lines left out as invalid (data.on_invalid = "skip"): {"count", "first_lines"}
    skipped_lines: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.targets:  # a manifest from before target kinds: top-k with a tail
            self.targets = {
                "kind": self.target_kind,
                "k": self.width,
                "tail": True,
                "width": self.width,
            }

    @property
    def tail(self) -> bool:
        """Whether the losses use a tail bucket (False for sampled targets)."""
        return bool(self.targets.get("tail", True))

    def codec_spec(self, where: str = "manifest") -> Codec:
        return Codec.from_info(self.codec, where)

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
        if version not in READS:
            raise DistillError(
                f"{where}: manifest schema version {version!r} is not supported by this "
                f"distill (knows {', '.join(map(str, READS))}); upgrade distill or re-run the "
                "teacher"
            )
        if version == 1 and isinstance(raw.get("dtypes"), dict):
            raw["width"] = raw.pop("k", None)
            raw["dtypes"] = {_V1_DTYPES.get(k, k): v for k, v in raw["dtypes"].items()}
            raw["schema_version"] = SCHEMA_VERSION  # what this object now describes
        try:
            raw["shards"] = [ShardStats(**s) for s in raw["shards"]]
            m = cls(**raw)
        except TypeError as e:
            raise DistillError(f"{where}: malformed manifest ({e})") from None
        if not isinstance(m.codec, dict) or not isinstance(m.targets, dict):
            raise DistillError(f"{where}: malformed manifest (codec/targets must be objects)")
        m.codec_spec(where)  # refuses an unknown codec name or version
        return m
