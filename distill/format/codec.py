"""Packed targets: the codec settings, and the section coding of packed v2 blocks.

distill writes one member codec, ``packed`` v2 (:data:`WRITTEN`): one tar member
``FIRSTKEY.targets.dpb`` per block of consecutive samples, laid out in
:mod:`distill.format.blockcodec`. It still reads the codecs of earlier versions (:data:`KNOWN`):
``npz`` v0 and ``packed`` v1, one member per sample, in :mod:`distill.format.legacy` (readers
only); v1 codes its samples with the sections below, as v2 codes a block.

A block's targets are flattened (:func:`flatten`) to one entry list: per row the exact entries,
then the drawn ones, each segment sorted by id ascending and delta-coded (``d = id - previous -
1``, the segment's first: ``d = id``), the deltas Rice-coded (a quotient in unary, the low bits
apart). Alongside: the entries per row minus 1 (``topp``: all; sampled kinds: the drawn ones;
nothing for ``topk``, whose rows hold k), at ``bit_length(k - 1)`` or ``bit_length(draws - 1)``
bits; the exact entries' values in one of :data:`VALUE_MAPS`:

- ``f16``: float16, 2 bytes;
- ``log8``: 1 byte, ``c = round(-lp / L * 255)`` clipped to [0, 255], decoded ``-c L / 255``
  (|error| <= L / 510 for lp >= -L; lp < -L reads as -L);
- ``pow8``: 1 byte, ``c = round(255 p^(1/4))`` clipped to [1, 255], decoded ``4 log(c / 255)``
  (|error of p^(1/4)| <= 1/510, more accurate where p is large);

the draw counts (exact), and for ``topk+sample`` per row ``m = log(1 - P_H)`` as float16 (the
tail's probabilities are off by at most 2^-11 |m| relative: <= 1.8e-4 in all); no padding is
stored.

Decoded (vectorised numpy, no per-token loops) to padded in-memory arrays: ids, float32
log-probs with ``-inf`` pads (a pad's id is its row's first, its count 0), uint16 counts. A
sampled entry's value is ``log(count / draws)`` (+ the row's tail mass for ``topk+sample``).
CRC32 and structural checks (lengths, id range, counts summing to ``draws``) turn truncated or
corrupt bytes into a DistillError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from distill.errors import DistillError
from distill.format.bitpack import bits_for, pack_bits, unpack_bits
from distill.format.spec import TargetSpec

KNOWN = {"npz": (0,), "packed": (1, 2)}  # what this distill reads
WRITTEN = ("packed", 2)  # what it writes: jobs cannot ask for anything else
VALUE_MAPS = ("log8", "pow8", "f16")
MEMBERS = {("npz", 0): "targets.npz", ("packed", 1): "targets.dpk", ("packed", 2): "targets.dpb"}

T = TypeVar("T")


def _known() -> str:
    return ", ".join(f"{n} v{v}" for n, vs in KNOWN.items() for v in vs)


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


@dataclass(frozen=True)
class Codec:
    """A member codec and its settings; ``info()`` is what the manifest records."""

    name: str = WRITTEN[0]
    version: int = WRITTEN[1]
    values: str = "log8"  # packed: log8 | pow8 | f16
    log_range: float = 20.0  # packed log8: L
    zstd: bool = False  # packed: one zstd frame per block (v2) or per sample (v1, read only)
    zstd_level: int = 3
    block_tokens: int = 16384  # packed v2: a block closes once it holds this many tokens

    @property
    def member(self) -> str:
        return MEMBERS[(self.name, self.version)]

    def info(self) -> dict[str, Any]:
        if self.name == "npz":
            return {"name": "npz", "version": 0}
        d: dict[str, Any] = {"name": self.name, "version": self.version, "values": self.values}
        if self.values == "log8":
            d["log_range"] = self.log_range
        d = {**d, "zstd": self.zstd, **({"zstd_level": self.zstd_level} if self.zstd else {})}
        return {**d, "block_tokens": self.block_tokens} if self.version >= 2 else d

    @classmethod
    def from_info(cls, info: dict[str, Any] | None, where: str) -> Codec:
        """The codec a manifest names (none: npz v0); unknown names or versions are refused."""
        if info is None:
            return cls("npz", 0)
        name, version = info.get("name"), info.get("version")
        if name not in KNOWN or version not in KNOWN[name]:
            raise DistillError(
                f"{where}: shard codec {name!r} version {version!r} is not supported by this "
                f"distill (knows {_known()}); upgrade distill"
            )
        try:
            c = cls(**info)
        except TypeError as e:
            raise DistillError(f"{where}: malformed codec {info!r} ({e})") from None
        c.check(where)
        return c

    def check(self, where: str = "targets") -> None:
        if self.name not in KNOWN or self.version not in KNOWN[self.name]:
            raise DistillError(f"{where}: codec {self.name!r} v{self.version} (knows {_known()})")
        if self.name == "packed" and self.values not in VALUE_MAPS:
            raise DistillError(
                f"{where}.values = {self.values!r} is not one of: {', '.join(VALUE_MAPS)}"
            )
        if self.name == "packed" and not 0.0 < self.log_range < 1e4:
            raise DistillError(f"{where}.log_range must be in (0, 1e4), got {self.log_range!r}")
        if self.zstd and self.name != "packed":
            raise DistillError(f'{where}.zstd needs {where}.codec = "packed"')
        if self.zstd and not 1 <= self.zstd_level <= 22:
            raise DistillError(f"{where}.zstd_level must be in [1, 22], got {self.zstd_level!r}")
        if not 1 <= self.block_tokens <= 2**24:
            raise DistillError(
                f"{where}.block_tokens must be in [1, {2**24}], got {self.block_tokens!r}"
            )


@dataclass(frozen=True)
class ShardFormat:
    """Everything an encoder needs: the codec, the target spec and the vocab size."""

    codec: Codec
    spec: TargetSpec
    vocab_size: int


def check_writable(name: str, version: int, src: str, section: str = "targets") -> None:
    """Refuse a codec distill no longer writes (``version`` 0: the newest), naming the field
    (``src: section.codec``) and what to use instead."""
    field = f"{src}: {section}" if src else section
    if name == "npz":
        raise DistillError(
            f'{field}.codec = "npz" is no longer written (npz v0 shard sets still read): use '
            f'{section}.codec = "packed" (with {section}.values = "f16" for float16 log-probs '
            "as npz stored)"
        )
    if name != WRITTEN[0]:
        return  # not a codec at all: the choice check names it
    if version == 1:
        raise DistillError(
            f"{field}.codec_version = 1 (packed v1, one tar member per sample) is no longer "
            f"written (v1 shard sets still read): use {section}.codec_version = 0 (the newest) "
            f"or {WRITTEN[1]}"
        )
    if version not in (0, WRITTEN[1]):
        raise DistillError(
            f"{field}.codec_version = {version} is not one of 0, {WRITTEN[1]} for codec "
            f"{name!r} (0 = the newest)"
        )


# --- values and masks ------------------------------------------------------------------


def quantise(v: np.ndarray, codec: Codec) -> bytes:
    if codec.values == "f16":
        return v.astype("<f2").tobytes()
    if codec.values == "log8":
        c = np.rint(-v.astype(np.float64) / codec.log_range * 255.0)
        return np.clip(c, 0, 255).astype(np.uint8).tobytes()
    c = np.rint(np.exp(v.astype(np.float64) / 4.0) * 255.0)  # pow8
    return np.clip(c, 1, 255).astype(np.uint8).tobytes()


def dequantise(buf: bytes, count: int, values: int, log_range: float) -> np.ndarray:
    if values == 2:  # f16
        return np.frombuffer(buf, dtype="<f2", count=count).astype(np.float32)
    c = np.frombuffer(buf, dtype=np.uint8, count=count)
    if values == 0:  # log8
        return c.astype(np.float32) * np.float32(-log_range / 255.0)
    if c.size and c.min() == 0:
        raise ValueError("pow8 code 0")
    return 4.0 * np.log(c.astype(np.float32) / np.float32(255.0))


def mask_runs(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    if m.size == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.flatnonzero(m[1:] != m[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [m.size]]))
    return np.concatenate([[0], runs]) if m[0] else runs


# --- flattening targets ---------------------------------------------------------------------


@dataclass
class Flat:
    """Targets flattened for the packed codecs: per row the exact entries then the drawn ones,
    each segment sorted by id and delta-coded (``d = id - previous - 1``, first ``d = id``)."""

    input_ids: np.ndarray  # [T] int64
    mask: np.ndarray  # [T] 0/1
    n: int  # rows (target positions)
    d: np.ndarray  # [E] id deltas
    exact_per_row: np.ndarray  # [n]
    drawn_per_row: np.ndarray  # [n]
    values: np.ndarray  # exact entries' log-probs (float32), in flat order
    counts: np.ndarray | None  # sampled kinds: drawn entries' counts, in flat order
    tail: np.ndarray | None  # topk+sample: per row log(1 - P_H) (float32)


def flatten(arrays: dict[str, np.ndarray | None], fmt: ShardFormat, where: str) -> Flat:
    """Check padded in-memory targets against ``fmt`` and flatten them (see :class:`Flat`)."""
    spec = fmt.spec
    ids = np.asarray(arrays["target_ids"]).astype(np.int64)
    vals = np.asarray(arrays["target_logprobs"]).astype(np.float32)
    input_ids = np.asarray(arrays["input_ids"]).astype(np.int64)
    mask = np.asarray(arrays["loss_mask"])

    def bad(msg: str) -> DistillError:
        return DistillError(f"{where}: cannot encode as packed {spec.kind}: {msg}")

    n, _ = ids.shape
    _check_tokens(ids, vals, input_ids, mask, fmt, bad)
    exact, drawn, counts = _entries(vals, arrays.get("target_counts"), spec, bad)
    keep = exact | drawn
    if n and (ids[keep].min() < 0 or ids[keep].max() >= fmt.vocab_size):
        raise bad("target id outside the vocab")
    d, order, is_exact = _delta_code(ids, keep, drawn, bad)
    tail = None
    if spec.kind == "topk+sample":
        # the row's tail mass, from its first drawn entry: value - log(count / draws)
        r_first = np.argmax(drawn, axis=1)
        rows = np.arange(n)
        tail = vals[rows, r_first] - np.log(counts[rows, r_first] / spec.draws).astype(np.float32)
    return Flat(
        input_ids=input_ids,
        mask=mask,
        n=n,
        d=d,
        exact_per_row=exact.sum(1),
        drawn_per_row=drawn.sum(1),
        values=vals[keep][order][is_exact],
        counts=counts[keep][order][~is_exact] if spec.sampled else None,
        tail=tail,
    )


BadInput = Callable[[str], DistillError]


def _check_tokens(
    ids: np.ndarray,
    vals: np.ndarray,
    input_ids: np.ndarray,
    mask: np.ndarray,
    fmt: ShardFormat,
    bad: BadInput,
) -> None:
    """The target arrays' width and shapes, the input ids' range, a 0/1 loss mask."""
    if ids.shape[1] != fmt.spec.width:
        raise bad(f"width {ids.shape[1]} != {fmt.spec.width}")
    if vals.shape != ids.shape:
        raise bad(f"target_logprobs {vals.shape} != target_ids {ids.shape}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= fmt.vocab_size):
        raise bad("input id outside the vocab")
    if mask.shape != input_ids.shape or (mask.size and not np.isin(mask, (0, 1)).all()):
        raise bad("loss_mask is not 0/1 per token")


def _entries(
    vals: np.ndarray, counts: np.ndarray | None, spec: TargetSpec, bad: BadInput
) -> tuple[np.ndarray, np.ndarray, Any]:
    """(exact, drawn) entry masks ``[n, w]`` and the int64 counts (sampled kinds), checked
    against the kind: which columns hold which entries, counts summing to ``draws``."""
    valid = np.isfinite(vals)
    if spec.sampled:
        if counts is None:
            raise bad("no draw counts")
        counts = np.asarray(counts).astype(np.int64)
        drawn = counts > 0
    else:
        drawn = np.zeros_like(valid)
    head = np.zeros_like(valid)
    head[:, : spec.head] = True
    exact = valid & ~drawn
    if spec.kind == "topk" and not valid.all():
        raise bad("missing entries")
    if spec.kind == "topp" and not (exact.any(1).all() and (drawn | (exact & ~head)).sum() == 0):
        raise bad("rows need 1..k exact entries")
    if spec.sampled:
        assert counts is not None
        if (exact & ~head).any() or (drawn & head).any() or not exact[:, : spec.head].all():
            raise bad("exact entries must be the first k columns, draws the rest")
        draws = spec.draws
        if (np.where(drawn, counts, 0).sum(1) != draws).any() or (counts[drawn] > draws).any():
            raise bad(f"draw counts must sum to {draws} per row")
        if (drawn & ~valid).any():
            raise bad("a drawn entry has no value")
    return exact, drawn, counts


def _delta_code(
    ids: np.ndarray, keep: np.ndarray, drawn: np.ndarray, bad: BadInput
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept entries sorted by (row, exact/drawn segment, id): (id deltas, the sort order
    over the kept entries, whether each sorted entry is exact)."""
    part = drawn.astype(np.int64)
    seg = (np.arange(ids.shape[0])[:, None] * 2 + part)[keep]
    fid = ids[keep]
    order = np.lexsort((fid, seg))
    seg, fid = seg[order], fid[order]
    first = np.ones(seg.size, dtype=bool)
    first[1:] = seg[1:] != seg[:-1]
    d = fid - np.where(first, 0, np.concatenate([[0], fid[:-1]]) + 1)
    if (d < 0).any():
        raise bad("duplicate target ids in a row")
    return d, order, part[keep][order] == 0


def row_entries(flat: Flat, spec: TargetSpec) -> bytes:
    """The row-entries section: exact (topp) or drawn (sampled kinds) entries per row - 1."""
    if spec.kind == "topp":
        return pack_bits(flat.exact_per_row - 1, bits_for(spec.k - 1))
    if spec.sampled:
        return pack_bits(flat.drawn_per_row - 1, bits_for(spec.draws - 1))
    return b""


def read_row_entries(buf: bytes, spec: TargetSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`row_entries`: (exact, drawn) entries per row."""
    m_exact = np.full(n, spec.head, dtype=np.int64)
    m_drawn = np.zeros(n, dtype=np.int64)
    if spec.kind == "topp":
        m_exact = unpack_bits(buf, n, bits_for(spec.k - 1)) + 1
        if (m_exact > spec.k).any():
            raise ValueError("row entries > k")
    elif spec.sampled:
        m_drawn = unpack_bits(buf, n, bits_for(spec.draws - 1)) + 1
        if (m_drawn > spec.draws).any():
            raise ValueError("row entries > draws")
    return m_exact, m_drawn


def unflatten(
    spec: TargetSpec,
    vocab: int,
    d: np.ndarray,
    m_exact: np.ndarray,
    m_drawn: np.ndarray,
    exact_values: np.ndarray,
    counts: np.ndarray | None,
    tail: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flat entries -> padded ``[n, width]`` ids, float32 log-probs (-inf pads), uint16 counts."""
    n, e = m_exact.size, d.size
    m = m_exact + m_drawn
    if int(m.sum()) != e:
        raise ValueError(f"rows hold {int(m.sum())} entries, the id section {e}")
    seg_len = np.stack([m_exact, m_drawn], 1).ravel()
    seg_start = np.cumsum(seg_len) - seg_len
    nonempty = seg_start[seg_len > 0]
    first = np.zeros(e, dtype=bool)
    first[nonempty] = True
    g = d + ~first
    cs = np.cumsum(g)
    fid = cs - np.repeat(cs[nonempty] - g[nonempty], seg_len[seg_len > 0])
    if e and (fid.max() >= vocab or fid.min() < 0):
        raise ValueError("target id outside the vocab")

    w, draws = spec.width, spec.draws
    row = np.repeat(np.arange(n), m)
    starts = np.cumsum(m) - m
    col = np.arange(e) - np.repeat(starts, m)
    is_exact = col < np.repeat(m_exact, m)
    fval = np.empty(e, dtype=np.float32)
    fval[is_exact] = exact_values
    counts_out = None
    if spec.sampled:
        assert counts is not None
        rsum = np.bincount(row[~is_exact], weights=counts, minlength=n)
        if (rsum != draws).any() or (counts < 1).any():
            raise ValueError(f"draw counts do not sum to {draws}")
        lv = np.log(counts / draws)
        if tail is not None:
            lv = lv + np.repeat(tail.astype(np.float64), m_drawn)
        fval[~is_exact] = lv
        counts_out = np.zeros((n, w), dtype=np.uint16)
        counts_out[row[~is_exact], col[~is_exact]] = counts
    vdt = id_dtype(vocab)
    ids_out = np.empty((n, w), dtype=vdt)
    if n:
        ids_out[:] = fid[starts][:, None].astype(vdt)
    ids_out[row, col] = fid
    vals_out = np.full((n, w), -np.inf, dtype=np.float32)
    vals_out[row, col] = fval
    return ids_out, vals_out, counts_out


def mask_from_runs(runs: np.ndarray, t: int) -> np.ndarray:
    if runs.sum() != t:
        raise ValueError("loss_mask runs do not add up to the tokens")
    return np.repeat((np.arange(runs.size) % 2).astype(np.uint8), runs)


# --- decoding ---------------------------------------------------------------------------


def guarded_decode(decode: Callable[[bytes], T], data: bytes, where: str, what: str) -> T:
    """``decode(data)``, with any failure a DistillError naming ``where`` (a corrupt ``what``)."""
    try:
        return decode(data)
    except DistillError as e:
        raise DistillError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure means corrupt bytes
        raise DistillError(f"{where}: corrupt {what} ({type(e).__name__}: {e})") from None


def member_codec(suffix: str) -> tuple[str, int] | None:
    """The (codec name, version) of a tar member suffix, or None."""
    return next((nv for nv, m in MEMBERS.items() if m == suffix), None)
