"""The target spec: which sparse teacher entries a shard set stores per target position.

``kind`` names the extraction (see :mod:`distill.teacher.extract` for how each is computed):

``topk``         the ``k`` most likely ids, log-probs normalised over the full vocab; a tail
                 bucket ``1 - sum p`` is implied (``tail = True``);
``topp``         the smallest prefix with mass ``>= top_p``, at most ``k`` entries, tail implied;
``sample``       ``draws`` draws from the full softmax: the unique ids and their counts, value
                 ``log(count / draws)``; no tail bucket (``tail = False``);
``topk+sample``  an exact top-``k`` head plus ``draws`` draws from the renormalised tail.

``width`` is the number of columns of the in-memory ``[rows, width]`` arrays (variable-width
rows are padded, see :mod:`distill.teacher.extract`). Plain data, no numpy or torch: the job
file, the codecs and the manifest all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.errors import DistillError

KINDS = ("topk", "topp", "sample", "topk+sample")
SAMPLING = ("iid", "systematic")
MAX_WIDTH = 65535  # k and draws fit the packed codec's 16-bit fields


@dataclass(frozen=True)
class TargetSpec:
    """What to extract per target position (see the module docstring)."""

    kind: str = "topk"
    k: int = 16
    top_p: float = 0.95
    draws: int = 50
    sampling: str = "iid"  # sampled kinds: iid | systematic

    @property
    def sampled(self) -> bool:
        return self.kind in ("sample", "topk+sample")

    @property
    def tail(self) -> bool:
        """Whether the losses add a tail bucket ``1 - sum p`` (False for sampled kinds)."""
        return not self.sampled

    @property
    def head(self) -> int:
        """Exact (non-sampled) entries per row: k, the cap k, 0, or k."""
        return 0 if self.kind == "sample" else self.k

    @property
    def width(self) -> int:
        """Columns of the in-memory ``[rows, width]`` arrays."""
        return {"topk": self.k, "topp": self.k, "sample": self.draws}.get(
            self.kind, self.k + self.draws
        )

    def check(self, vocab_size: int | None = None, where: str = "targets") -> None:
        """Raise DistillError naming the field for a bad combination."""
        if self.kind not in KINDS:
            raise DistillError(f"{where}.kind = {self.kind!r} is not one of: {', '.join(KINDS)}")
        if not 1 <= self.k <= MAX_WIDTH:
            raise DistillError(f"{where}.k must be in [1, {MAX_WIDTH}], got {self.k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise DistillError(f"{where}.top_p must be in (0, 1], got {self.top_p!r}")
        if not 1 <= self.draws <= MAX_WIDTH:
            raise DistillError(f"{where}.draws must be in [1, {MAX_WIDTH}], got {self.draws!r}")
        if self.sampling not in SAMPLING:
            raise DistillError(
                f"{where}.sampling = {self.sampling!r} is not one of: {', '.join(SAMPLING)}"
            )
        if self.sampled and self.width > MAX_WIDTH:
            raise DistillError(f"{where}.k + {where}.draws must be <= {MAX_WIDTH}")
        if vocab_size is not None and self.kind != "sample" and self.k >= vocab_size:
            raise DistillError(
                f"{where}.k = {self.k} must be smaller than the teacher vocab ({vocab_size})"
            )

    def info(self) -> dict[str, object]:
        """What a reader (the manifest, the losses) needs: the relevant fields, tail, width."""
        d: dict[str, object] = {"kind": self.kind}
        if self.kind != "sample":
            d["k"] = self.k
        if self.kind == "topp":
            d["top_p"] = self.top_p
        if self.sampled:
            d["draws"] = self.draws
            d["sampling"] = self.sampling
        return {**d, "tail": self.tail, "width": self.width}
