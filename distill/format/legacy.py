"""Readers (only) of the member codecs of earlier distill versions: ``npz`` v0 and ``packed`` v1.

Nothing writes these any more: jobs write packed v2 (:mod:`distill.format.blockcodec`). They
stay readable because shard sets written by earlier versions (npz v0 was the default before
packed codecs existed, v1 before blocks) may still be in users' buckets; the fixtures under
``tests/data/old_shards`` (real ones, and synthetic ones with the arrays they were written from)
keep these readers proven. Both store one tar member per sample.

``npz`` v0 (member ``KEY.targets.npz``): an uncompressed NumPy archive of ``input_ids``,
``loss_mask``, ``topk_ids``, ``topk_logprobs`` (float16) and, for sampled kinds,
``topk_counts`` (read as ``target_ids``, ``target_logprobs``, ``target_counts``), padded as
in memory. Shard sets written before codecs existed have no ``codec`` in their manifest and
read as npz v0.

``packed`` v1 (member ``KEY.targets.dpk``): a 40-byte little-endian header (magic ``DPK``,
version, kind, value map, flags (1 = zstd), Rice parameter, vocab, T, rows, entries, mask runs,
k, draws, L, CRC32 of all the other bytes of the member), a table of the eight section lengths
(8 x uint32), then the payload: the eight sections concatenated (one zstd frame when the zstd
flag is set), coded as in :mod:`distill.format.codec`:

====  ===========  ==============================================================
 #    section      contents
====  ===========  ==============================================================
 0    input_ids    T ids at ``id_bits = bit_length(V - 1)`` bits each (big-endian bit order)
 1    loss_mask    run lengths, alternating 0-run / 1-run starting with a (maybe empty)
                   0-run, at ``bit_length(T)`` bits each
 2    row_entries  entries per row minus 1 (``topp``: all; sampled kinds: sampled ids)
 3    id_unary     id deltas, Rice-coded with parameter ``b`` (chosen per sample): the
 4    id_rice      quotients ``d >> b`` in unary (ones closed by a zero) in 3, low bits in 4
 5    values       exact entries' log-probs (``f16``, ``log8`` or ``pow8``)
 6    counts       draw count minus 1 per sampled entry, at ``bit_length(draws - 1)`` bits
 7    tail_mass    ``topk+sample``: per row ``log(1 - P_H)`` as float16
====  ===========  ==============================================================
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from distill.errors import DistillError
from distill.format.bitpack import bits_for, rice_decode, unpack_bits, zstd
from distill.format.codec import (
    VALUE_MAPS,
    dequantise,
    guarded_decode,
    id_dtype,
    mask_from_runs,
    read_row_entries,
    unflatten,
)
from distill.format.spec import KINDS, TargetSpec

Arrays = dict[str, np.ndarray | None]

# npz v0 members name the arrays as the code of their time did (before the target names)
NPZ_FIELDS = {
    "input_ids": "input_ids",
    "loss_mask": "loss_mask",
    "target_ids": "topk_ids",
    "target_logprobs": "topk_logprobs",
}
NPZ_COUNTS = "topk_counts"
_MAGIC = b"DPK"
_HEAD = struct.Struct("<3sBBBBBIIIIIHHfI")  # magic ver kind values flags b V T n E R k N L crc
_SECTIONS = struct.Struct("<8I")
_ZSTD = 1


def decode_sample(codec: tuple[str, int], data: bytes, where: str) -> tuple[Arrays, int | None]:
    """One npz v0 or packed v1 member -> (arrays, the vocab packed v1 records; npz: None)."""
    if codec == ("npz", 0):
        return decode_npz(data, where), None
    if codec == ("packed", 1):
        return decode_packed(data, where)
    raise DistillError(f"{where}: {codec[0]} v{codec[1]} is not a legacy codec")


def decode_npz(data: bytes, where: str) -> Arrays:
    """An npz v0 member -> its arrays (float16 log-probs); a bad archive is a DistillError."""
    try:
        with np.load(io.BytesIO(data)) as z:
            missing = [k for k in NPZ_FIELDS.values() if k not in z.files]
            if missing:
                raise DistillError(f"{where} lacks {', '.join(missing)}")
            out: Arrays = {name: z[stored] for name, stored in NPZ_FIELDS.items()}
            out["target_counts"] = z[NPZ_COUNTS] if NPZ_COUNTS in z.files else None
            return out
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise DistillError(f"{where}: corrupt sample ({e})") from None


def decode_packed(data: bytes, where: str) -> tuple[Arrays, int]:
    """Packed v1 bytes -> (arrays, vocab size); any inconsistency is a DistillError."""
    return guarded_decode(_decode_packed, data, where, "sample")


def _open_sample(data: bytes) -> tuple[tuple[Any, ...], list[bytes]]:
    """Check a v1 member's header and CRC; (header fields, the eight sections)."""
    if len(data) < _HEAD.size + _SECTIONS.size:
        raise ValueError(f"truncated header ({len(data)} bytes)")
    head = _HEAD.unpack_from(data)
    magic, ver, kind_i, val_i, flags, vocab, crc = (head[i] for i in (0, 1, 2, 3, 4, 6, 14))
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
        payload = zstd(None).decompress(payload, max_output_size=sum(lens))
    if len(payload) != sum(lens):
        raise ValueError(f"payload is {len(payload)} bytes, sections say {sum(lens)}")
    offs = np.concatenate([[0], np.cumsum(lens)]).tolist()
    return head, [payload[offs[i] : offs[i + 1]] for i in range(8)]


def _decode_packed(data: bytes) -> tuple[Arrays, int]:
    (_, _, kind_i, val_i, _, b, vocab, t, n, e, r, k, draws, lrange, _), sec = _open_sample(data)
    spec = TargetSpec(kind=KINDS[kind_i], k=k, draws=draws)
    input_ids = unpack_bits(sec[0], t, bits_for(vocab - 1))
    if (input_ids >= vocab).any():
        raise ValueError("input id outside the vocab")
    mask = mask_from_runs(unpack_bits(sec[1], r, bits_for(t)), t)
    if int(mask[1:].sum()) != n:
        raise ValueError(f"loss_mask has {int(mask[1:].sum())} targets, header says {n}")
    m_exact, m_drawn = read_row_entries(sec[2], spec, n)
    ne, nd = int(m_exact.sum()), int(m_drawn.sum())
    if ne + nd != e:
        raise ValueError(f"rows hold {ne + nd} entries, header says {e}")
    d = rice_decode(sec[3], sec[4], e, b)
    values = dequantise(sec[5], ne, val_i, lrange) if spec.kind != "sample" else np.zeros(0)
    counts = unpack_bits(sec[6], nd, bits_for(draws - 1)) + 1 if spec.sampled else None
    tail = None
    if spec.kind == "topk+sample":
        tail = np.frombuffer(sec[7], dtype="<f2", count=n)
    ids, vals, cnt = unflatten(spec, vocab, d, m_exact, m_drawn, values, counts, tail)
    arrays: Arrays = {
        "input_ids": input_ids.astype(id_dtype(vocab)),
        "loss_mask": mask,
        "target_ids": ids,
        "target_logprobs": vals,
        "target_counts": cnt,
    }
    return arrays, int(vocab)
