"""Packed v2: one tar member (``FIRSTKEY.targets.dpb``) holds a block of consecutive samples.

A per-sample tar member costs a 512-byte header plus padding to 512 bytes (~35 bytes per
target position on short chat answers), and per-sample headers and zstd frames cannot share
anything. A block concatenates its samples (their tokens, masks and target rows, in order) and
codes them as one, with the sections of :mod:`distill.format.codec` (those of the per-sample
packed v1, now read only: :mod:`distill.format.legacy`) plus Rice-coded mask runs and draw
counts; the chat template that starts every sample then compresses away under zstd.

Member layout (little-endian): a 32-byte header, then the body (one zstd frame when the zstd
flag is set):

- header: magic ``DPB``, version (2), kind, value map, flags (1 = zstd, 2 = alignment), 0,
  vocab (u32),
  k (u16), draws (u16), L (f32), samples S (u32), raw body bytes (u32), CRC32 of all the
  other bytes of the member (u32);
- body: ``rice_ids, rice_runs, rice_counts, t_bits`` (4 x u8), mask runs R (u32), entries E
  (u32), the ten section lengths (10 x u32); with flag 2: the Rice parameters of the offset
  gaps and lengths (2 x u8) and the seven alignment section lengths (7 x u32); S key lengths
  (u16) and the keys (UTF-8); S token counts at ``t_bits`` bits; then the sections:

====  ==============================================================================
 #    contents
====  ==============================================================================
 0    input ids of all samples, ``bit_length(V - 1)`` bits each
 1-2  the concatenated loss mask as runs (0-run, 1-run, ...), Rice: unary quotients, low bits
 3    entries per row - 1 (``topp``: exact; sampled kinds: drawn)
 4-5  id deltas, Rice (one parameter per block)
 6    exact entries' values (log8 / pow8 / f16)
 7-8  draw counts - 1, Rice
 9    ``topk+sample``: per row log(1 - P_H), float16
10-11 flag 2: per token ``start - previous end`` zigzag-coded, Rice (first: previous end 0)
12-13 flag 2: per token ``end - start``, Rice
14    flag 2: per sample its number of content spans (u16)
15    flag 2: the content spans, ``(start, end)`` characters (u32 pairs)
16    flag 2: per target position the actual next token's log-probability, float16
====  ==============================================================================

Blocks without flag 2 (every shard set written before ``targets.alignment`` existed, and those
written without it) have the same bytes as before; their samples read with the alignment
fields None.

The rows of sample i are its positions t with ``loss_mask_i[t + 1] == 1``, so the row split
follows from the token counts and the mask. A block decodes in one vectorised pass and is then
cut into samples (views into the block's arrays). Bytes are a pure function of the samples
and the codec settings (zstd at a fixed level, no timestamps), so re-encoding reproduces them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from distill.errors import DistillError
from distill.format.bitpack import bits_for, pack_bits, rice_decode, rice_encode, unpack_bits, zstd
from distill.format.codec import (
    VALUE_MAPS,
    Flat,
    ShardFormat,
    dequantise,
    flatten,
    guarded_decode,
    id_dtype,
    mask_from_runs,
    mask_runs,
    quantise,
    read_row_entries,
    row_entries,
    unflatten,
)
from distill.format.spec import KINDS, TargetSpec

Arrays = dict[str, np.ndarray | None]

VERSION = 2
_MAGIC = b"DPB"
_HEAD = struct.Struct("<3sBBBBBIHHfIII")  # magic ver kind values flags 0 V k N L S raw crc
_META = struct.Struct("<4BII10I")  # rice ids/runs/counts, t_bits, R, E, section lengths
_ZSTD = 1
_ALIGN = 2  # the body carries the alignment sections (targets.alignment)
_FLAGS = _ZSTD | _ALIGN
_ALIGN_META = struct.Struct("<2B7I")  # rice gaps/lengths, the seven alignment section lengths
_FIELDS = ("input_ids", "loss_mask", "target_ids", "target_logprobs")
_ALIGN_FIELDS = ("token_offsets", "content_spans", "token_logprobs")


def split_blocks(lengths: Sequence[int], block_tokens: int) -> list[tuple[int, int]]:
    """[lo, hi) sample ranges: a block closes once it holds ``block_tokens`` tokens."""
    out, lo, tokens = [], 0, 0
    for i, t in enumerate(lengths):
        tokens += int(t)
        if tokens >= block_tokens:
            out.append((lo, i + 1))
            lo, tokens = i + 1, 0
    if lo < len(lengths):
        out.append((lo, len(lengths)))
    return out


def encode_block(
    keys: Sequence[str], samples: Sequence[Arrays], fmt: ShardFormat, where: str = ""
) -> bytes:
    """Consecutive samples (their keys and padded arrays) -> one packed v2 member."""
    where = (f"{where}: " if where else "") + (
        f"block {keys[0]}..{keys[-1]}" if keys else "empty block"
    )
    f = flatten(_concatenate(keys, samples, fmt.spec, where), fmt, where)
    lengths = np.array([len(a["input_ids"]) for a in samples], dtype=np.int64)  # type: ignore[arg-type]
    t_bits = bits_for(int(lengths.max()))
    rice, n_runs, sections = _sections(f, fmt)
    key_bytes = [k.encode() for k in keys]
    if max(len(k) for k in key_bytes) > 0xFFFF:
        raise DistillError(f"{where}: a sample key is longer than 65535 bytes")
    align_meta, align = b"", list[bytes]()
    if _aligned(keys, samples, where):
        a_rice, align = _align_sections(samples, where)
        align_meta = _ALIGN_META.pack(*a_rice, *map(len, align))
    body = b"".join(
        [
            _META.pack(*rice, t_bits, n_runs, f.d.size, *map(len, sections)),
            align_meta,
            np.array([len(k) for k in key_bytes], dtype="<u2").tobytes(),
            *key_bytes,
            pack_bits(lengths, t_bits),
            *sections,
            *align,
        ]
    )
    return _frame(body, fmt, len(samples), _ALIGN if align_meta else 0)


def _aligned(keys: Sequence[str], samples: Sequence[Arrays], where: str) -> bool:
    """Whether the block's samples carry the alignment fields (all of them, or none)."""
    have = {
        k: [a.get(f) is not None for f in _ALIGN_FIELDS] for k, a in zip(keys, samples, strict=True)
    }
    if all(all(h) for h in have.values()):
        return True
    if not any(any(h) for h in have.values()):
        return False
    raise DistillError(f"{where}: some samples carry alignment fields and some do not")


def _align_sections(samples: Sequence[Arrays], where: str) -> tuple[tuple[int, int], list[bytes]]:
    """The alignment sections: per token the gap ``start - previous end`` (zigzag; the first
    token's previous end is 0) and the length ``end - start``, Rice-coded; per sample its
    number of content spans (u16) and the spans (u32 pairs); per target position the actual
    token's log-probability (float16)."""
    off = [np.asarray(a["token_offsets"], dtype=np.int64).reshape(-1, 2) for a in samples]
    gaps, lens = [], []
    for o in off:
        prev = np.concatenate([[0], o[:-1, 1]])
        gaps.append(o[:, 0] - prev)
        lens.append(o[:, 1] - o[:, 0])
    gap, length = np.concatenate(gaps), np.concatenate(lens)
    if (length < 0).any() or (off and min(int(o.min(initial=0)) for o in off) < 0):
        raise DistillError(f"{where}: token offsets must be non-negative with start <= end")
    zig = np.where(gap >= 0, 2 * gap, -2 * gap - 1)
    b_gap, gap_q, gap_low = rice_encode(zig, bits_for(int(zig.max(initial=0))))
    b_len, len_q, len_low = rice_encode(length, bits_for(int(length.max(initial=0))))
    spans = [np.asarray(a["content_spans"], dtype=np.int64).reshape(-1, 2) for a in samples]
    if max(len(sp) for sp in spans) > 0xFFFF or any((sp < 0).any() for sp in spans):
        raise DistillError(f"{where}: bad content spans")
    lps = np.concatenate([np.asarray(a["token_logprobs"], dtype=np.float32) for a in samples])
    sections = [
        gap_q,
        gap_low,
        len_q,
        len_low,
        np.array([len(sp) for sp in spans], dtype="<u2").tobytes(),
        np.concatenate(spans).astype("<u4").tobytes(),
        lps.astype("<f2").tobytes(),
    ]
    return (b_gap, b_len), sections


def _concatenate(
    keys: Sequence[str], samples: Sequence[Arrays], spec: TargetSpec, where: str
) -> Arrays:
    """The block's samples as one: their arrays concatenated, in order (rows checked against
    each sample's mask, since the decoder splits rows by the masks)."""
    if not samples or len(keys) != len(samples):
        raise DistillError(f"{where}: a block needs samples, one key each")
    for key, a in zip(keys, samples, strict=True):
        rows, n = np.asarray(a["target_ids"]).shape[0], int(np.asarray(a["loss_mask"])[1:].sum())
        if rows != n:
            raise DistillError(
                f"{where}: sample {key} has {rows} target rows, its loss mask {n} target positions"
            )
    cat: Arrays = {f: np.concatenate([np.asarray(a[f]) for a in samples]) for f in _FIELDS}
    cat["target_counts"] = None
    if spec.sampled:
        if any(a.get("target_counts") is None for a in samples):
            raise DistillError(f"{where}: cannot encode as packed {spec.kind}: no draw counts")
        cat["target_counts"] = np.concatenate([np.asarray(a["target_counts"]) for a in samples])
    return cat


def _sections(f: Flat, fmt: ShardFormat) -> tuple[tuple[int, int, int], int, list[bytes]]:
    """The ten sections of a flattened block: (Rice parameters of ids, mask runs and counts,
    the number of mask runs, the sections)."""
    spec = fmt.spec
    id_bits = bits_for(fmt.vocab_size - 1)
    runs = mask_runs(f.mask)
    b_ids, ids_q, ids_low = rice_encode(f.d, id_bits)
    b_runs, runs_q, runs_low = rice_encode(runs, bits_for(len(f.mask)))
    b_cnt, cnt_q, cnt_low = 0, b"", b""
    if f.counts is not None:
        b_cnt, cnt_q, cnt_low = rice_encode(f.counts - 1, bits_for(spec.draws - 1))
    sections = [
        pack_bits(f.input_ids, id_bits),
        runs_q,
        runs_low,
        row_entries(f, spec),
        ids_q,
        ids_low,
        quantise(f.values, fmt.codec) if spec.kind != "sample" else b"",
        cnt_q,
        cnt_low,
        f.tail.astype("<f2").tobytes() if f.tail is not None else b"",
    ]
    return (b_ids, b_runs, b_cnt), int(runs.size), sections


def _frame(body: bytes, fmt: ShardFormat, n_samples: int, flags: int = 0) -> bytes:
    """Header + body (zstd-compressed when the codec says so), the CRC over both."""
    spec, codec = fmt.spec, fmt.codec
    raw_len = len(body)
    if codec.zstd:
        body = zstd(codec.zstd_level).compress(body)
        flags |= _ZSTD
    head = _HEAD.pack(
        _MAGIC,
        VERSION,
        KINDS.index(spec.kind),
        VALUE_MAPS.index(codec.values),
        flags,
        0,
        fmt.vocab_size,
        spec.k,
        spec.draws,
        codec.log_range,
        n_samples,
        raw_len,
        0,
    )[:-4]
    crc = zlib.crc32(body, zlib.crc32(head))  # everything but the CRC field itself
    return head + struct.pack("<I", crc) + body


def decode_block(data: bytes, where: str) -> tuple[list[tuple[str, Arrays]], int]:
    """One packed v2 member -> ([(key, arrays)] in order, vocab); corrupt input: DistillError."""
    return guarded_decode(_decode_block, data, where, "block")


def _decode_block(data: bytes) -> tuple[list[tuple[str, Arrays]], int]:
    head, body = _open_block(data)
    _, _, kind_i, val_i, flags, _, vocab, k, draws, lrange, n_samples, _, _ = head
    b_ids, b_runs, b_cnt, t_bits, r, e, *lens = _META.unpack_from(body)
    a_meta: tuple[int, ...] = ()
    if flags & _ALIGN:
        a_meta = _ALIGN_META.unpack_from(body, _META.size)
    keys, lengths, sec = _layout(body, n_samples, t_bits, lens + list(a_meta[2:]))
    spec = TargetSpec(kind=KINDS[kind_i], k=k, draws=draws)
    t = int(lengths.sum())
    input_ids = unpack_bits(sec[0], t, bits_for(vocab - 1))
    if (input_ids >= vocab).any():
        raise ValueError("input id outside the vocab")
    mask = mask_from_runs(rice_decode(sec[1], sec[2], r, b_runs), t)
    rows = _rows_per_sample(mask, lengths)
    n = int(rows.sum())
    m_exact, m_drawn = read_row_entries(sec[3], spec, n)
    ne, nd = int(m_exact.sum()), int(m_drawn.sum())
    if ne + nd != e:
        raise ValueError(f"rows hold {ne + nd} entries, the block says {e}")
    d = rice_decode(sec[4], sec[5], e, b_ids)
    values = dequantise(sec[6], ne, val_i, lrange) if spec.kind != "sample" else np.zeros(0)
    counts = rice_decode(sec[7], sec[8], nd, b_cnt) + 1 if spec.sampled else None
    tail = np.frombuffer(sec[9], dtype="<f2", count=n) if spec.kind == "topk+sample" else None
    targets = unflatten(spec, vocab, d, m_exact, m_drawn, values, counts, tail)
    x = input_ids.astype(id_dtype(vocab))
    out = _split_samples(keys, x, mask, lengths, rows, targets)
    if a_meta:
        _split_align(out, sec[10:], a_meta[0], a_meta[1], lengths, rows, t, n)
    return out, int(vocab)


def _split_align(
    out: list[tuple[str, Arrays]],
    sec: list[bytes],
    b_gap: int,
    b_len: int,
    lengths: np.ndarray,
    rows: np.ndarray,
    t: int,
    n: int,
) -> None:
    """Decode the alignment sections and add each sample's share to its arrays."""
    zig = rice_decode(sec[0], sec[1], t, b_gap)
    gap = np.where(zig % 2 == 0, zig // 2, -(zig + 1) // 2)
    length = rice_decode(sec[2], sec[3], t, b_len)
    n_spans = np.frombuffer(sec[4], dtype="<u2", count=len(out)).astype(np.int64)
    spans = np.frombuffer(sec[5], dtype="<u4", count=2 * int(n_spans.sum())).astype(np.int32)
    lps = np.frombuffer(sec[6], dtype="<f2", count=n).astype(np.float32)
    tok_cut, row_cut = np.cumsum(lengths)[:-1], np.cumsum(rows)[:-1]
    span_cut = np.cumsum(n_spans)[:-1]
    parts = zip(
        np.split(gap, tok_cut),
        np.split(length, tok_cut),
        np.split(spans.reshape(-1, 2), span_cut),
        np.split(lps, row_cut),
        strict=True,
    )
    for (_, arrays), (g, ln, sp, lp) in zip(out, parts, strict=True):
        # start_i = end_{i-1} + gap_i and end_i = start_i + len_i: ends are a running sum
        end = np.cumsum(g + ln)
        off = np.stack([end - ln, end], axis=1)
        if off.size and off.min() < 0:
            raise ValueError("negative token offset")
        arrays.update(token_offsets=off.astype(np.int32), content_spans=sp, token_logprobs=lp)


def _open_block(data: bytes) -> tuple[tuple[Any, ...], bytes]:
    """Check a member's header and CRC; (header fields, the decompressed body)."""
    if len(data) < _HEAD.size:
        raise ValueError(f"truncated header ({len(data)} bytes)")
    head = _HEAD.unpack_from(data)
    magic, ver, kind_i, val_i, flags, _, vocab, _, _, _, n_samples, raw_len, crc = head
    if magic != _MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    if ver != VERSION:
        raise DistillError(f"packed block version {ver} is not supported (knows {VERSION})")
    if kind_i >= len(KINDS) or val_i >= len(VALUE_MAPS) or vocab < 1 or n_samples < 1:
        raise ValueError("bad header")
    if flags & ~_FLAGS:
        raise DistillError(f"packed block flags {flags:#x} are not known (upgrade distill)")
    if zlib.crc32(data[_HEAD.size :], zlib.crc32(data[: _HEAD.size - 4])) != crc:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    body = data[_HEAD.size :]
    if flags & _ZSTD:
        body = zstd(None).decompress(body, max_output_size=raw_len)
    if len(body) != raw_len:
        raise ValueError(f"body is {len(body)} bytes, the header says {raw_len}")
    return head, body


def _layout(
    body: bytes, n_samples: int, t_bits: int, lens: list[int]
) -> tuple[list[str], np.ndarray, list[bytes]]:
    """The body after its fixed fields: (keys, token counts, the ten sections and the seven
    alignment sections when ``lens`` has their lengths too)."""
    pos = _META.size + (_ALIGN_META.size if len(lens) > 10 else 0)
    key_lens = np.frombuffer(body, dtype="<u2", count=n_samples, offset=pos).astype(np.int64)
    pos += 2 * n_samples
    ends = pos + np.cumsum(key_lens)
    keys = [body[a - n : a].decode() for a, n in zip(ends.tolist(), key_lens.tolist(), strict=True)]
    pos = int(ends[-1])
    t_len = (n_samples * t_bits + 7) // 8
    lengths = unpack_bits(body[pos : pos + t_len], n_samples, t_bits)
    pos += t_len
    if pos + sum(lens) != len(body):
        raise ValueError("section lengths do not add up to the body")
    offs = np.concatenate([[pos], pos + np.cumsum(lens)]).tolist()
    return keys, lengths, [body[offs[i] : offs[i + 1]] for i in range(len(lens))]


def _rows_per_sample(mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per sample ``sum(mask_i[1:])``, from the block's concatenated mask."""
    tok_end = np.cumsum(lengths)
    starts = tok_end - lengths
    cs = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    first = np.zeros(lengths.size, dtype=np.int64)
    first[lengths > 0] = mask[starts[lengths > 0]]
    return cs[tok_end] - cs[starts] - first


def _split_samples(
    keys: list[str],
    input_ids: np.ndarray,
    mask: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
    targets: tuple[np.ndarray, np.ndarray, np.ndarray | None],
) -> list[tuple[str, Arrays]]:
    """Cut the block's arrays into its samples (views), keys in order."""
    ids, vals, cnt = targets
    tok_cut, row_cut = np.cumsum(lengths)[:-1], np.cumsum(rows)[:-1]
    x, masks = np.split(input_ids, tok_cut), np.split(mask, tok_cut)
    parts = [np.split(ids, row_cut), np.split(vals, row_cut)]
    parts.append(np.split(cnt, row_cut) if cnt is not None else [None] * len(keys))
    return [
        (
            key,
            {
                "input_ids": x[i],
                "loss_mask": masks[i],
                "target_ids": parts[0][i],
                "target_logprobs": parts[1][i],
                "target_counts": parts[2][i],
            },
        )
        for i, key in enumerate(keys)
    ]
