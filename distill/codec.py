"""Shard member codecs: how one sample's arrays become the bytes of its tar member.

``npz`` v0 (member ``KEY.targets.npz``, the original format and the default): an
uncompressed NumPy archive of ``input_ids``, ``loss_mask``, ``topk_ids``, ``topk_logprobs``
(float16) and, for sampled kinds, ``topk_counts``. Variable-width rows are padded with the
sentinel of :mod:`distill.targets` (first id, ``-inf``, count 0). Shard sets written before
codecs existed have no ``codec`` in their manifest and read as ``npz`` v0.

``packed`` v1 (member ``KEY.targets.dpk``): a 40-byte little-endian header (magic ``DPK``,
version, kind, value map, flags, Rice parameter, vocab, T, rows, entries, mask runs, k, draws,
L, CRC32 of all the other bytes of the member), a table of the eight section lengths
(8 x uint32), then the payload: the eight sections concatenated (one zstd frame when the zstd
flag is set); no padding is stored:

====  ===========  ==============================================================
 #    section      contents
====  ===========  ==============================================================
 0    input_ids    T ids at ``id_bits = bit_length(V - 1)`` bits each (big-endian bit order)
 1    loss_mask    run lengths, alternating 0-run / 1-run starting with a (maybe empty)
                   0-run, at ``bit_length(T)`` bits each
 2    row_entries  entries per row minus 1 (``topp``: all; sampled kinds: sampled ids), at
                   ``bit_length(k - 1)`` or ``bit_length(draws - 1)`` bits; empty for topk
 3    id_unary     ids, per row segment (head, then sampled tail) sorted ascending and
 4    id_rice      delta-coded: d = id - previous - 1 (the segment's first: d = id), Rice
                   code with parameter ``b`` (chosen per sample): quotient ``d >> b`` in
                   unary (ones closed by a zero) in 3, the low b bits in 4
 5    values       exact entries' log-probs: ``f16`` (float16, 2 bytes), ``log8`` (1 byte,
                   ``c = round(-lp / L * 255)`` clipped to [0, 255], decoded ``-c L / 255``;
                   |error| <= L / 510 for lp >= -L, lp < -L reads as -L) or ``pow8`` (1 byte,
                   ``c = round(255 p^(1/4))`` clipped to [1, 255], decoded ``4 log(c / 255)``;
                   |error of p^(1/4)| <= 1/510, more accurate where p is large)
 6    counts       draw count minus 1 per sampled entry, at ``bit_length(draws - 1)`` bits
 7    tail_mass    ``topk+sample``: per row ``m = log(1 - P_H)`` as float16 (the tail's
                   probabilities are off by at most 2^-11 |m| relative: <= 1.8e-4 in all)
====  ===========  ==============================================================

Decoded (vectorised numpy, no per-token loops) to the same padded in-memory arrays as npz
(ids, float32 log-probs with ``-inf`` pads, uint16 counts). A sampled entry's value is
``log(count / draws)`` (+ the row's tail mass for ``topk+sample``), counts are exact.
The CRC32 and structural checks (lengths, id range, counts summing to
``draws``) turn a truncated or corrupt sample into a DistillError.
"""

from __future__ import annotations

import io
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.errors import DistillError
from distill.targets import KINDS, TargetSpec

KNOWN = {"npz": (0,), "packed": (1,)}
VALUE_MAPS = ("log8", "pow8", "f16")
NPZ_FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs")
MEMBERS = {"npz": "targets.npz", "packed": "targets.dpk"}

_MAGIC = b"DPK"
_HEAD = struct.Struct("<3sBBBBBIIIIIHHfI")  # magic ver kind values flags b V T n E R k N L crc
_SECTIONS = struct.Struct("<8I")
_ZSTD = 1


def bits_for(x: int) -> int:
    """Bits to store integers 0..x (0 bits when x == 0)."""
    return int(max(int(x), 0)).bit_length()


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


@dataclass(frozen=True)
class Codec:
    """A member codec and its settings; ``info()`` is what the manifest records."""

    name: str = "npz"
    version: int = 0
    values: str = "log8"  # packed: log8 | pow8 | f16
    log_range: float = 20.0  # packed log8: L
    zstd: bool = False  # packed: one zstd frame per sample
    zstd_level: int = 3

    @property
    def member(self) -> str:
        return MEMBERS[self.name]

    def info(self) -> dict[str, Any]:
        if self.name == "npz":
            return {"name": "npz", "version": 0}
        d: dict[str, Any] = {"name": self.name, "version": self.version, "values": self.values}
        if self.values == "log8":
            d["log_range"] = self.log_range
        return {**d, "zstd": self.zstd, **({"zstd_level": self.zstd_level} if self.zstd else {})}

    @classmethod
    def from_info(cls, info: dict[str, Any] | None, where: str) -> Codec:
        """The codec a manifest names; unknown names or versions are refused."""
        if info is None:
            return cls()
        name, version = info.get("name"), info.get("version")
        if name not in KNOWN or version not in KNOWN[name]:
            known = ", ".join(f"{n} v{v}" for n, vs in KNOWN.items() for v in vs)
            raise DistillError(
                f"{where}: shard codec {name!r} version {version!r} is not supported by this "
                f"distill (knows {known}); upgrade distill"
            )
        try:
            c = cls(**info)
        except TypeError as e:
            raise DistillError(f"{where}: malformed codec {info!r} ({e})") from None
        c.check(where)
        return c

    def check(self, where: str = "targets") -> None:
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


@dataclass(frozen=True)
class ShardFormat:
    """Everything an encoder needs: the codec, the target spec and the vocab size."""

    codec: Codec
    spec: TargetSpec
    vocab_size: int


NPZ_V0 = Codec()


# --- bit packing (big-endian bit order, as np.packbits) -------------------------------------


def pack_bits(v: np.ndarray, b: int) -> bytes:
    """Non-negative integers < 2**b, b bits each, concatenated and zero-padded to a byte."""
    if b == 0 or v.size == 0:
        return b""
    if b in (8, 16, 32):
        return np.asarray(v).astype(f">u{b // 8}").tobytes()
    v = np.asarray(v, dtype=np.uint64)
    shifts = np.arange(b - 1, -1, -1, dtype=np.uint64)
    return np.packbits(((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)).tobytes()


def unpack_bits(buf: bytes, count: int, b: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` int64 values of ``b`` (<= 57) bits."""
    if b == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    if len(buf) * 8 < count * b:
        raise ValueError(f"bit section too short ({len(buf)} bytes for {count} x {b} bits)")
    if b in (8, 16, 32):
        return np.frombuffer(buf, dtype=f">u{b // 8}", count=count).astype(np.int64)
    arr = np.frombuffer(buf + bytes(8), dtype=np.uint8)
    off = np.arange(count, dtype=np.int64) * b
    win = arr[(off >> 3)[:, None] + np.arange(8)]  # 8-byte big-endian windows
    w = np.ascontiguousarray(win).view(">u8").ravel().astype(np.uint64)
    w = (w << (off & 7).astype(np.uint64)) >> np.uint64(64 - b)
    return w.astype(np.int64)


def _rice_param(d: np.ndarray, max_b: int) -> int:
    """The Rice parameter minimising sum(d >> b) + len(d) * (b + 1)."""
    if d.size == 0:
        return 0
    costs = [int((d >> b).sum()) + d.size * (b + 1) for b in range(max_b + 1)]
    return int(np.argmin(costs))


def _unary(q: np.ndarray) -> bytes:
    bits = np.ones(int(q.sum()) + q.size, dtype=np.uint8)
    bits[np.cumsum(q + 1) - 1] = 0
    return np.packbits(bits).tobytes()


def _un_unary(buf: bytes, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    zeros = np.flatnonzero(np.unpackbits(np.frombuffer(buf, dtype=np.uint8)) == 0)
    if zeros.size < count:
        raise ValueError("id section too short")
    return np.diff(zeros[:count], prepend=-1) - 1


_local = threading.local()


def _zstd(level: int | None) -> Any:
    """A per-thread zstd compressor (level) or decompressor (None)."""
    import zstandard

    cache = _local.__dict__.setdefault("zstd", {})
    if level not in cache:
        cache[level] = (
            zstandard.ZstdDecompressor() if level is None else zstandard.ZstdCompressor(level)
        )
    return cache[level]


# --- npz v0 --------------------------------------------------------------------------------


def encode_npz(arrays: dict[str, np.ndarray | None]) -> bytes:
    buf = io.BytesIO()
    out = {k: arrays[k] for k in NPZ_FIELDS}
    out["topk_logprobs"] = np.asarray(out["topk_logprobs"]).astype(np.float16, copy=False)
    if arrays.get("topk_counts") is not None:
        out["topk_counts"] = arrays["topk_counts"]
    np.savez(buf, **out)
    return buf.getvalue()


def decode_npz(data: bytes, where: str) -> dict[str, np.ndarray | None]:
    try:
        with np.load(io.BytesIO(data)) as z:
            missing = [k for k in NPZ_FIELDS if k not in z.files]
            if missing:
                raise DistillError(f"{where} lacks {', '.join(missing)}")
            out: dict[str, np.ndarray | None] = {k: z[k] for k in NPZ_FIELDS}
            out["topk_counts"] = z["topk_counts"] if "topk_counts" in z.files else None
            return out
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise DistillError(f"{where}: corrupt sample ({e})") from None


# --- packed v1 -----------------------------------------------------------------------------


def _quantise(v: np.ndarray, codec: Codec) -> bytes:
    if codec.values == "f16":
        return v.astype("<f2").tobytes()
    if codec.values == "log8":
        c = np.rint(-v.astype(np.float64) / codec.log_range * 255.0)
        return np.clip(c, 0, 255).astype(np.uint8).tobytes()
    c = np.rint(np.exp(v.astype(np.float64) / 4.0) * 255.0)  # pow8
    return np.clip(c, 1, 255).astype(np.uint8).tobytes()


def _dequantise(buf: bytes, count: int, values: int, log_range: float) -> np.ndarray:
    if values == 2:  # f16
        return np.frombuffer(buf, dtype="<f2", count=count).astype(np.float32)
    c = np.frombuffer(buf, dtype=np.uint8, count=count)
    if values == 0:  # log8
        return c.astype(np.float32) * np.float32(-log_range / 255.0)
    if c.size and c.min() == 0:
        raise ValueError("pow8 code 0")
    return 4.0 * np.log(c.astype(np.float32) / np.float32(255.0))


def _mask_runs(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    if m.size == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.flatnonzero(m[1:] != m[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [m.size]]))
    return np.concatenate([[0], runs]) if m[0] else runs


def encode_packed(
    arrays: dict[str, np.ndarray | None], fmt: ShardFormat, where: str = "sample"
) -> bytes:
    """One sample's arrays -> packed v1 bytes (see the module docstring)."""
    spec, codec, vocab = fmt.spec, fmt.codec, fmt.vocab_size
    ids = np.asarray(arrays["topk_ids"]).astype(np.int64)
    vals = np.asarray(arrays["topk_logprobs"]).astype(np.float32)
    counts = arrays.get("topk_counts")
    input_ids = np.asarray(arrays["input_ids"]).astype(np.int64)
    mask = np.asarray(arrays["loss_mask"])
    n, w = ids.shape
    k, draws, kind = spec.k, spec.draws, spec.kind

    def bad(msg: str) -> DistillError:
        return DistillError(f"{where}: cannot encode as packed {kind}: {msg}")

    if w != spec.width:
        raise bad(f"width {w} != {spec.width}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise bad("input id outside the vocab")
    if mask.size and not np.isin(mask, (0, 1)).all():
        raise bad("loss_mask is not 0/1")
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
    if kind == "topk" and not valid.all():
        raise bad("missing entries")
    if kind == "topp" and not (exact.any(1).all() and (drawn | (exact & ~head)).sum() == 0):
        raise bad("rows need 1..k exact entries")
    if spec.sampled:
        if (exact & ~head).any() or (drawn & head).any() or not exact[:, : spec.head].all():
            raise bad("exact entries must be the first k columns, draws the rest")
        if (np.where(drawn, counts, 0).sum(1) != draws).any() or (counts[drawn] > draws).any():
            raise bad(f"draw counts must sum to {draws} per row")
        if (drawn & ~valid).any():
            raise bad("a drawn entry has no value")
    keep = exact | drawn
    if n and (ids[keep].min() < 0 or ids[keep].max() >= vocab):
        raise bad("target id outside the vocab")

    # segments: per row the exact entries, then the drawn ones; ids ascending in each
    part = drawn.astype(np.int64)
    seg = (np.arange(n)[:, None] * 2 + part)[keep]
    fid = ids[keep]
    order = np.lexsort((fid, seg))
    seg, fid = seg[order], fid[order]
    fval, fcnt = vals[keep][order], (counts[keep][order] if spec.sampled else None)
    first = np.ones(seg.size, dtype=bool)
    first[1:] = seg[1:] != seg[:-1]
    d = fid - np.where(first, 0, np.concatenate([[0], fid[:-1]]) + 1)
    if (d < 0).any():
        raise bad("duplicate target ids in a row")
    id_bits = bits_for(vocab - 1)
    b = _rice_param(d, id_bits)
    is_exact = part[keep][order] == 0

    runs = _mask_runs(mask)
    sections = [
        pack_bits(input_ids, id_bits),
        pack_bits(runs, bits_for(len(mask))),
        b"",
        _unary(d >> b),
        pack_bits(d & ((1 << b) - 1), b),
        b"",
        b"",
        b"",
    ]
    if kind == "topp":
        sections[2] = pack_bits(exact.sum(1) - 1, bits_for(k - 1))
    if spec.sampled:
        sections[2] = pack_bits(drawn.sum(1) - 1, bits_for(draws - 1))
        sections[6] = pack_bits(fcnt[~is_exact] - 1, bits_for(draws - 1))  # type: ignore[index]
    if kind != "sample":
        sections[5] = _quantise(fval[is_exact], codec)
    if kind == "topk+sample":
        # the row's tail mass, from its first drawn entry: value - log(count / draws)
        r_first = np.argmax(drawn, axis=1)
        rows = np.arange(n)
        lt = vals[rows, r_first] - np.log(counts[rows, r_first] / draws).astype(np.float32)
        sections[7] = lt.astype("<f2").tobytes()
    payload = b"".join(sections)
    flags = 0
    if codec.zstd:
        payload = _zstd(codec.zstd_level).compress(payload)
        flags |= _ZSTD
    head_bytes = _HEAD.pack(
        _MAGIC,
        1,
        KINDS.index(kind),
        VALUE_MAPS.index(codec.values),
        flags,
        b,
        vocab,
        len(input_ids),
        n,
        int(fid.size),
        int(runs.size),
        k,
        draws,
        codec.log_range,
        0,
    )[:-4]
    body = _SECTIONS.pack(*(len(s) for s in sections)) + payload
    crc = zlib.crc32(body, zlib.crc32(head_bytes))  # everything but the CRC field itself
    return head_bytes + struct.pack("<I", crc) + body


def decode_packed(data: bytes, where: str) -> tuple[dict[str, np.ndarray | None], int]:
    """Packed v1 bytes -> (arrays, vocab size); any inconsistency is a DistillError."""
    try:
        return _decode_packed(data)
    except DistillError as e:
        raise DistillError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt sample
        raise DistillError(f"{where}: corrupt sample ({type(e).__name__}: {e})") from None


def _decode_packed(data: bytes) -> tuple[dict[str, np.ndarray | None], int]:
    if len(data) < _HEAD.size + _SECTIONS.size:
        raise ValueError(f"truncated header ({len(data)} bytes)")
    (magic, ver, kind_i, val_i, flags, b, vocab, t, n, e, r, k, draws, lrange, crc) = (
        _HEAD.unpack_from(data)
    )
    if magic != _MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    if ver != 1:
        raise DistillError(f"packed sample version {ver} is not supported (knows 1)")
    if kind_i >= len(KINDS) or val_i >= len(VALUE_MAPS) or vocab < 1:
        raise ValueError("bad header")
    if zlib.crc32(data[_HEAD.size :], zlib.crc32(data[: _HEAD.size - 4])) != crc:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    lens = _SECTIONS.unpack_from(data, _HEAD.size)
    payload = data[_HEAD.size + _SECTIONS.size :]
    if flags & _ZSTD:
        payload = _zstd(None).decompress(payload, max_output_size=sum(lens))
    if len(payload) != sum(lens):
        raise ValueError(f"payload is {len(payload)} bytes, sections say {sum(lens)}")
    offs = np.concatenate([[0], np.cumsum(lens)]).tolist()
    sec = [payload[offs[i] : offs[i + 1]] for i in range(8)]
    kind = KINDS[kind_i]
    spec = TargetSpec(kind=kind, k=k, draws=draws)
    id_bits = bits_for(vocab - 1)
    vdt = id_dtype(vocab)

    input_ids = unpack_bits(sec[0], t, id_bits)
    runs = unpack_bits(sec[1], r, bits_for(t))
    if runs.sum() != t or (input_ids >= vocab).any():
        raise ValueError("input_ids / loss_mask do not add up")
    mask = np.repeat((np.arange(r) % 2).astype(np.uint8), runs)
    if int(mask[1:].sum()) != n:
        raise ValueError(f"loss_mask has {int(mask[1:].sum())} targets, header says {n}")

    nh = spec.head if kind != "topp" else 0  # fixed exact entries per row
    if kind == "topp":
        m_exact = unpack_bits(sec[2], n, bits_for(k - 1)) + 1
        if (m_exact > k).any():
            raise ValueError("row entries > k")
    else:
        m_exact = np.full(n, nh, dtype=np.int64)
    m_drawn = np.zeros(n, dtype=np.int64)
    if spec.sampled:
        m_drawn = unpack_bits(sec[2], n, bits_for(draws - 1)) + 1
        if (m_drawn > draws).any():
            raise ValueError("row entries > draws")
    m = m_exact + m_drawn
    if int(m.sum()) != e:
        raise ValueError(f"rows hold {int(m.sum())} entries, header says {e}")

    # ids: Rice-coded deltas, reset at each segment (exact part, then drawn part, per row)
    d = (_un_unary(sec[3], e) << b) | unpack_bits(sec[4], e, b)
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

    # flat (row-major) -> padded [n, width]
    w = spec.width
    row = np.repeat(np.arange(n), m)
    starts = np.cumsum(m) - m
    col = np.arange(e) - np.repeat(starts, m)
    is_exact = col < np.repeat(m_exact, m)
    fval = np.empty(e, dtype=np.float32)
    ne = int(m_exact.sum())
    if kind != "sample":
        fval[is_exact] = _dequantise(sec[5], ne, val_i, lrange)
    counts_out = None
    if spec.sampled:
        c = unpack_bits(sec[6], e - ne, bits_for(draws - 1)) + 1
        rsum = np.bincount(row[~is_exact], weights=c, minlength=n)
        if (rsum != draws).any():
            raise ValueError(f"draw counts do not sum to {draws}")
        lv = np.log(c / draws)
        if kind == "topk+sample":
            lt = np.frombuffer(sec[7], dtype="<f2", count=n).astype(np.float64)
            lv = lv + np.repeat(lt, m_drawn)
        fval[~is_exact] = lv
        counts_out = np.zeros((n, w), dtype=np.uint16)
        counts_out[row[~is_exact], col[~is_exact]] = c
    ids_out = np.empty((n, w), dtype=vdt)
    if n:
        ids_out[:] = fid[starts][:, None].astype(vdt)
    ids_out[row, col] = fid
    vals_out = np.full((n, w), -np.inf, dtype=np.float32)
    vals_out[row, col] = fval
    arrays = {
        "input_ids": input_ids.astype(vdt),
        "loss_mask": mask,
        "topk_ids": ids_out,
        "topk_logprobs": vals_out,
        "topk_counts": counts_out,
    }
    return arrays, int(vocab)


def encode(arrays: dict[str, np.ndarray | None], fmt: ShardFormat | None, where: str) -> bytes:
    """Encode with ``fmt.codec`` (npz v0 when ``fmt`` is None)."""
    if fmt is None or fmt.codec.name == "npz":
        return encode_npz(arrays)
    return encode_packed(arrays, fmt, where)


def member_codec(suffix: str) -> str | None:
    """The codec name of a tar member suffix, or None."""
    return next((name for name, m in MEMBERS.items() if m == suffix), None)
