"""Shards: WebDataset tar files of per-sample sparse teacher targets.

distill writes ``packed`` v2: one member ``FIRSTKEY.targets.dpb`` holds a block of consecutive
samples (see :mod:`distill.format.blockcodec`), and the archive ends after its end-of-archive
blocks (no padding to a 10 KiB tar record). Shards of earlier versions still read (see
:mod:`distill.format.legacy`): ``npz`` v0 and ``packed`` v1, one member per sample
(``KEY.targets.npz`` or ``KEY.targets.dpk``). Each sample decodes to a :class:`TargetSample`:

- ``input_ids``     [T]    token ids (uint16 when the vocab fits, else int32)
- ``loss_mask``     [T]    uint8, 1 = assistant token (a label)
- ``target_ids``      [N, w] the teacher's stored ids at the N target positions
- ``target_logprobs`` [N, w] log-probabilities normalised over the full vocab (float32; float16
  from npz v0); for sampled entries ``log(count / draws)`` (see
  :mod:`distill.teacher.extract`); ``-inf`` marks padding in variable-width rows
- ``target_counts``   [N, w] uint16 draw counts, sampled kinds only (else None)

With ``targets.alignment`` (cross-tokenizer distillation; None in shard sets without it):

- ``token_offsets``   [T, 2] int32 each token's character ``(start, end)`` in the rendered
  text, as the teacher's fast tokenizer gives them (characters, not bytes)
- ``content_spans``   [turns, 2] int32 the characters of each assistant turn's content
  (stripped of surrounding whitespace; see :func:`distill.data.align.content_spans`)
- ``token_logprobs``  [N] float32 the teacher's log-probability of the actual next token at each
  target position (stored as float16)

Target positions are the t with ``loss_mask[t + 1] == 1`` (position t predicts token t+1), in
order, so positions need not be stored. For ``topk``/``topp`` the tail mass is
``1 - sum(exp(target_logprobs))``. Tar members carry a fixed mtime, so the same samples always
give the same bytes. The member suffix names the codec, so a shard reads without its manifest;
samples come out in the order they were written.
"""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from distill.errors import DistillError
from distill.format import legacy
from distill.format.blockcodec import decode_block, encode_block, split_blocks
from distill.format.codec import WRITTEN, ShardFormat, id_dtype, member_codec

FIELDS = ("input_ids", "loss_mask", "target_ids", "target_logprobs")
ALIGN_FIELDS = ("token_offsets", "content_spans", "token_logprobs")

__all__ = [
    "ALIGN_FIELDS",
    "FIELDS",
    "ShardFormat",
    "ShardStats",
    "TargetSample",
    "id_dtype",
    "read_shard",
    "shard_name",
    "wds_samples",
    "write_shard",
]


@dataclass
class TargetSample:
    key: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    target_ids: np.ndarray
    target_logprobs: np.ndarray
    target_counts: np.ndarray | None = None  # sampled kinds: draws per stored id (0: exact/pad)
    # cross-tokenizer alignment (``targets.alignment``; None in shard sets written without it)
    token_offsets: np.ndarray | None = None  # [T, 2] int32 character start/end in the text
    content_spans: np.ndarray | None = None  # [turns, 2] int32 characters of assistant content
    token_logprobs: np.ndarray | None = None  # [N] float32 log p(the actual next token)

    def arrays(self) -> dict[str, np.ndarray | None]:
        return {k: getattr(self, k) for k in (*FIELDS, "target_counts", *ALIGN_FIELDS)}

    @property
    def aligned(self) -> bool:
        """Whether the sample carries the alignment fields."""
        return self.token_offsets is not None

    def target_positions(self) -> np.ndarray:
        return np.flatnonzero(self.loss_mask[1:])

    def _align_ok(self, n: int) -> bool:
        present = [getattr(self, f) is not None for f in ALIGN_FIELDS]
        if not any(present):
            return True
        return (
            all(present)
            and self.token_offsets.shape == (len(self.input_ids), 2)  # type: ignore[union-attr]
            and self.content_spans.ndim == 2  # type: ignore[union-attr]
            and self.content_spans.shape[1] == 2  # type: ignore[union-attr]
            and self.token_logprobs.shape == (n,)  # type: ignore[union-attr]
        )

    def validate(self, where: str) -> None:
        n = int(self.loss_mask[1:].sum())
        ok = (
            self.input_ids.ndim == 1
            and self.loss_mask.shape == self.input_ids.shape
            and self.target_ids.shape == self.target_logprobs.shape
            and self.target_ids.ndim == 2
            and self.target_ids.shape[0] == n
            and (self.target_counts is None or self.target_counts.shape == self.target_ids.shape)
            and self._align_ok(n)
        )
        if not ok:
            raise DistillError(
                f"{where}: sample {self.key} has inconsistent shapes "
                f"(input_ids {self.input_ids.shape}, loss_mask {self.loss_mask.shape}, "
                f"target_ids {self.target_ids.shape}, "
                f"target_logprobs {self.target_logprobs.shape}); "
                "the shard is corrupt"
            )


@dataclass
class ShardStats:
    name: str
    samples: int
    tokens: int
    target_tokens: int
    nbytes: int
    sha256: str
    first_key: str
    last_key: str


def write_shard(path: Path, samples: Iterable[TargetSample], fmt: ShardFormat) -> ShardStats:
    """Write samples to a packed v2 tar file at ``path`` and return its stats (with sha256)."""
    samples = list(samples)
    if not samples:
        raise ValueError("a shard needs at least one sample")
    if (fmt.codec.name, fmt.codec.version) != WRITTEN:
        raise DistillError(
            f"{path}: distill writes only {WRITTEN[0]} v{WRITTEN[1]}, not "
            f"{fmt.codec.name} v{fmt.codec.version} (older codecs are read only)"
        )
    with path.open("wb") as f:
        _write_blocks(f, samples, fmt, str(path))
    with path.open("rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return ShardStats(
        name=path.name,
        samples=len(samples),
        tokens=sum(len(s.input_ids) for s in samples),
        target_tokens=sum(s.target_ids.shape[0] for s in samples),
        nbytes=path.stat().st_size,
        sha256=sha256,
        first_key=samples[0].key,
        last_key=samples[-1].key,
    )


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header as WebDataset's TarWriter writes it (fixed mtime: the same samples
    always give the same bytes; an int mtime needs no PAX header)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uname = info.gname = "bigdata"
    return info


def _write_blocks(out: BinaryIO, samples: list[TargetSample], fmt: ShardFormat, where: str) -> None:
    """One member per block, and the archive ends after its end-of-archive blocks (``tarfile``
    would pad it to a 10 KiB record)."""
    for lo, hi in split_blocks([len(s.input_ids) for s in samples], fmt.codec.block_tokens):
        block = samples[lo:hi]
        data = encode_block([s.key for s in block], [s.arrays() for s in block], fmt, where)
        info = _member_info(f"{block[0].key}.{fmt.codec.member}", len(data))
        out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        out.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
    out.write(bytes(2 * tarfile.BLOCKSIZE))  # end of archive


def read_shard(path: Path, vocab_size: int | None = None) -> Iterator[TargetSample]:
    """Yield the samples of a local tar shard (any known codec), validating each one.

    With ``vocab_size`` (the manifest's), a packed sample written for another vocab is refused.
    """
    try:
        with tarfile.open(path, "r|") as tf:  # streaming: members in write order
            for info in tf:
                key, _, suffix = info.name.partition(".")
                codec = member_codec(suffix)
                if codec is None or not info.isfile():
                    raise DistillError(f"{path}: unexpected member {info.name!r}")
                data = tf.extractfile(info).read()  # type: ignore[union-attr]
                yield from _member_samples(path, key, codec, data, vocab_size)
            # a file cut at a member boundary reads as a short archive: demand the end marker
            if path.stat().st_size < tf.offset + 2 * tarfile.BLOCKSIZE:
                raise DistillError(f"{path}: corrupt shard (truncated: no end-of-archive marker)")
    except (tarfile.TarError, zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise DistillError(f"{path}: corrupt shard ({e})") from None


def _member_samples(
    path: Path | str, key: str, codec: tuple[str, int], data: bytes, vocab_size: int | None
) -> Iterator[TargetSample]:
    """The validated samples of one tar member."""
    where = f"{path}: sample {key}"
    if codec != WRITTEN:
        arrays, vocab = legacy.decode_sample(codec, data, where)
        decoded = [(key, arrays)]
    else:
        where = f"{path}: block {key}"
        decoded, vocab = decode_block(data, where)
        if decoded[0][0] != key:
            raise DistillError(f"{where}: corrupt block (first sample is {decoded[0][0]!r})")
    if vocab is not None and vocab_size is not None and vocab != vocab_size:
        raise DistillError(
            f"{where} was packed for vocab size {vocab}, the manifest says {vocab_size}"
        )
    for k, arrays in decoded:
        s = TargetSample(key=k, **arrays)  # type: ignore[arg-type]
        s.validate(str(path))
        yield s


def wds_samples(
    src: Iterable[dict[str, Any]], vocab_size: int | None = None
) -> Iterator[dict[str, Any]]:
    """A WebDataset pipeline stage: raw tar samples in, one dict per distill sample out.

    ``wds.WebDataset(shard_urls).compose(wds_samples)`` (or ``functools.partial(wds_samples,
    vocab_size=manifest.vocab_size)``) yields, in order, exactly the samples :func:`read_shard`
    and so the student's loader read: ``{"__key__", "__url__", "input_ids", "loss_mask",
    "target_ids", "target_logprobs", "target_counts", "token_offsets", "content_spans",
    "token_logprobs"}`` with the arrays of :class:`TargetSample` (the last three None without
    ``targets.alignment``). A
    packed v2 member (one tar member per block of samples) is expanded into its samples.
    WebDataset must not decode the members (no ``.decode()`` before this stage).
    """
    for raw in src:
        key, url = raw["__key__"], str(raw.get("__url__", "<webdataset>"))
        members = [k for k in raw if not k.startswith("__") and member_codec(k)]
        if len(members) != 1:
            raise DistillError(f"{url}: {key}: expected one distill member, got {sorted(raw)}")
        codec = member_codec(members[0])
        assert codec is not None
        for s in _member_samples(url, key, codec, raw[members[0]], vocab_size):
            yield {"__key__": s.key, "__url__": url, **s.arrays()}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"
