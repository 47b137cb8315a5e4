"""Bit-level building blocks of the packed codecs: fixed-width packing, unary and Rice codes.

Bits are big-endian within bytes (as :func:`numpy.packbits`). Everything is vectorised numpy;
the decoders raise ``ValueError`` on short input, which the codecs turn into a DistillError.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


def bits_for(x: int) -> int:
    """Bits to store integers 0..x (0 bits when x == 0)."""
    return int(max(int(x), 0)).bit_length()


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


def rice_param(d: np.ndarray, max_b: int) -> int:
    """The Rice parameter minimising sum(d >> b) + len(d) * (b + 1)."""
    if d.size == 0:
        return 0
    costs = [int((d >> b).sum()) + d.size * (b + 1) for b in range(max_b + 1)]
    return int(np.argmin(costs))


def unary(q: np.ndarray) -> bytes:
    """Each q as q ones closed by a zero."""
    bits = np.ones(int(q.sum()) + q.size, dtype=np.uint8)
    bits[np.cumsum(q + 1) - 1] = 0
    return np.packbits(bits).tobytes()


def un_unary(buf: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`unary`: the first ``count`` values."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    zeros = np.flatnonzero(np.unpackbits(np.frombuffer(buf, dtype=np.uint8)) == 0)
    if zeros.size < count:
        raise ValueError("unary section too short")
    return np.diff(zeros[:count], prepend=-1) - 1


def rice_encode(v: np.ndarray, max_b: int) -> tuple[int, bytes, bytes]:
    """Rice code of non-negative ints: (parameter b, quotients in unary, low b bits)."""
    b = rice_param(v, max_b)
    return b, unary(v >> b), pack_bits(v & ((1 << b) - 1), b)


def rice_decode(quotients: bytes, low: bytes, count: int, b: int) -> np.ndarray:
    """Inverse of :func:`rice_encode`."""
    return (un_unary(quotients, count) << b) | unpack_bits(low, count, b)


_local = threading.local()


def zstd(level: int | None) -> Any:
    """A per-thread zstd compressor (level) or decompressor (None)."""
    import zstandard

    cache = _local.__dict__.setdefault("zstd", {})
    if level not in cache:
        cache[level] = (
            zstandard.ZstdDecompressor() if level is None else zstandard.ZstdCompressor(level)
        )
    return cache[level]
