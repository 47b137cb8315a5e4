"""A split's encoded samples on local disk, written once and read back a shard at a time.

Token ids (int32) and loss masks (uint8) are appended to two flat files; a small index (record
index, file, line, start, length per sample, in record order) finds them. Reading maps the
files (``numpy.memmap``), so a run holds the shards in flight in memory, not the dataset.
"""

from __future__ import annotations

import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.dataset import Sample, key


class TokenStore:
    """Samples appended in record order, then read by record range (:meth:`samples`).

    ``stems``: each file's key stem (a sample's key is ``<stem>-<line>``). Removes its
    directory on :meth:`close` (and on exit as a context manager)."""

    def __init__(self, stems: list[str], scratch: Path | None = None) -> None:
        self.stems = stems
        self.dir = Path(tempfile.mkdtemp(prefix="distill-tokens-", dir=scratch))
        self._ids = (self.dir / "ids.bin").open("wb")
        self._mask = (self.dir / "mask.bin").open("wb")
        # targets.alignment: offsets.bin ([T, 2] int32 per token) and spans.bin (each sample's
        # content spans, [turns, 2] int32, the first at span_start[j])
        self._offsets: Any = None
        self._spans: Any = None
        self.span_start = array("q", [0])
        self.index = array("q")  # record index of each stored sample, ascending
        self.file = array("i")
        self.line = array("q")
        self.start = array("q")
        self.length = array("i")
        self._n = 0
        self._maps: tuple[np.ndarray, np.ndarray] | None = None

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(
        self,
        index: int,
        file: int,
        line: int,
        ids: np.ndarray,
        mask: np.ndarray,
        offsets: np.ndarray | None = None,
        content: np.ndarray | None = None,
    ) -> None:
        """One sample; ``offsets`` and ``content`` (targets.alignment) for all or for none."""
        if self.index and index <= self.index[-1]:
            raise ValueError(f"record {index} after {self.index[-1]}: append in record order")
        mixed = bool(self.index) and (offsets is not None) != (self._offsets is not None)
        if mixed or (offsets is None) != (content is None):
            raise ValueError("offsets and content spans: for every sample or for none")
        if offsets is not None:
            if self._offsets is None:
                self._offsets = (self.dir / "offsets.bin").open("wb")
                self._spans = (self.dir / "spans.bin").open("wb")
            self._offsets.write(np.ascontiguousarray(offsets, dtype=np.int32).tobytes())
            sp = np.ascontiguousarray(content, dtype=np.int32).reshape(-1, 2)
            self._spans.write(sp.tobytes())
            self.span_start.append(self.span_start[-1] + len(sp))
        self._ids.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self._mask.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        self.index.append(index)
        self.file.append(file)
        self.line.append(line)
        self.start.append(self._n)
        self.length.append(len(ids))
        self._n += len(ids)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def tokens(self) -> int:
        return self._n

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            self._ids.close()
            self._mask.close()
            if self._offsets is not None:
                self._offsets.close()
                self._spans.close()
            if self._n == 0:
                self._maps = (np.zeros(0, np.int32), np.zeros(0, np.uint8))
            else:
                self._maps = (
                    np.memmap(self.dir / "ids.bin", dtype=np.int32, mode="r"),
                    np.memmap(self.dir / "mask.bin", dtype=np.uint8, mode="r"),
                )
        return self._maps

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """The positions ``[a, b)`` of the stored samples whose record index is in
        ``[lo, hi)``."""
        idx = np.frombuffer(self.index, dtype=np.int64) if self.index else np.zeros(0, np.int64)
        return int(np.searchsorted(idx, lo)), int(np.searchsorted(idx, hi))

    def samples(self, lo: int, hi: int) -> list[Sample]:
        """The stored samples of records ``[lo, hi)``, in order (copies: the store may close)."""
        a, b = self.span(lo, hi)
        if a == b:
            return []
        ids, mask = self._arrays()
        offs = spans = None
        if self._offsets is not None:
            offs, spans = (_map_pairs(self.dir / n) for n in ("offsets.bin", "spans.bin"))
        out = []
        for j in range(a, b):
            s, n = self.start[j], self.length[j]
            out.append(
                Sample(
                    key=key(self.stems[self.file[j]], self.line[j]),
                    input_ids=np.array(ids[s : s + n]),
                    loss_mask=np.array(mask[s : s + n]),
                    offsets=None if offs is None else np.array(offs[s : s + n]),
                    content=None
                    if spans is None
                    else np.array(spans[self.span_start[j] : self.span_start[j + 1]]),
                )
            )
        return out

    def tokens_in(self, lo: int, hi: int) -> int:
        """Tokens of the stored samples of records ``[lo, hi)``."""
        a, b = self.span(lo, hi)
        return int(sum(self.length[a:b]))

    def close(self) -> None:
        self._maps = None
        self._ids.close()
        self._mask.close()
        if self._offsets is not None:
            self._offsets.close()
            self._spans.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _map_pairs(path: Path) -> np.ndarray:
    """An int32 ``[n, 2]`` file, mapped (an empty one as an empty array: numpy cannot map it)."""
    if path.stat().st_size == 0:
        return np.zeros((0, 2), dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r").reshape(-1, 2)
