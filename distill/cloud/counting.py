"""The job's dataset as the teacher will batch it: tokens, targets, padding and attention
context, counted with the teacher's own tokenizer (:func:`count_data`), and the pass's FLOPs.

:func:`count_data` tokenises every line (``cost-estimate --exact``);
:func:`distill.cloud.sampling.estimate_data` tokenises a uniform sample of the lines and
extrapolates, with a 95% bound per count (:class:`SplitSample`). :class:`DataCounts` may be
built by hand (bench/fanout.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import Job
from distill.teacher.fit import TeacherProfile

DEFAULT_SAMPLE_LINES = 20_000  # cost-estimate --sample-lines: lines tokenised per split
# the counts a sampled split bounds (DataCounts' fields, summed over splits)
BOUNDED = ("samples", "tokens", "target_tokens", "padded_tokens", "attention_token_ctx")


@dataclass(frozen=True)
class SplitSample:
    """How one split's counts were estimated from a uniform sample of its lines."""

    lines: int  # the split's non-blank lines (the first data.max_samples of them)
    sampled: int  # lines read and tokenised
    skipped: int  # sampled lines that gave no sample (invalid, data.on_invalid = "skip")
    padding: float  # padded / real tokens of the sample's own token-budget batches
    bounds: dict[str, int]  # 95% half-widths of the split's BOUNDED counts


@dataclass
class DataCounts:
    samples: int = 0
    shards: int = 0
    tokens: int = 0
    target_tokens: int = 0
    padded_tokens: int = 0  # what the forward passes process (token-budget batches)
    attention_token_ctx: int = 0  # sum over padded tokens of their batch's length
    per_split: dict[str, dict[str, int]] = field(default_factory=dict)
    shard_tokens: dict[str, list[int]] = field(default_factory=dict)  # real tokens per shard
    sampled: dict[str, SplitSample] = field(default_factory=dict)  # splits estimated (else exact)

    @property
    def exact(self) -> bool:
        return not self.sampled

    def bound(self, name: str) -> int:
        """The 95% half-width of a total (0: counted); the splits' samples are independent,
        so their variances add."""
        return math.ceil(math.sqrt(sum(s.bounds.get(name, 0) ** 2 for s in self.sampled.values())))

    def add_split(
        self,
        split: str,
        samples: int,
        tokens: int,
        target_tokens: int,
        padded_tokens: int,
        attention_token_ctx: int,
        shard_tokens: list[int],
    ) -> None:
        """Add one split's counts (its shards: one per ``shard_tokens`` entry)."""
        self.samples += samples
        self.shards += len(shard_tokens)
        self.tokens += tokens
        self.target_tokens += target_tokens
        self.padded_tokens += padded_tokens
        self.attention_token_ctx += attention_token_ctx
        self.shard_tokens[split] = shard_tokens
        self.per_split[split] = {
            "samples": samples,
            "tokens": tokens,
            "target_tokens": target_tokens,
            "padded_tokens": padded_tokens,
        }

    def at_bound(self, sign: int) -> DataCounts:
        """The counts with every sampled one moved by its 95% bound (``sign`` -1: the low end,
        1: the high end), per split and in total; each split's shards keep their number and
        scale with its tokens."""
        c = DataCounts(sampled=self.sampled)
        for split, p in self.per_split.items():
            s = self.sampled.get(split)
            b = s.bounds if s else {}
            moved = {k: max(v + sign * b.get(k, 0), 0) for k, v in p.items()}
            scale = moved["tokens"] / max(p["tokens"], 1)
            sizes = [round(t * scale) for t in self.shard_tokens.get(split, [])]
            c.add_split(split, **moved, attention_token_ctx=0, shard_tokens=sizes)
        c.shards = self.shards
        c.attention_token_ctx = max(
            self.attention_token_ctx + sign * self.bound("attention_token_ctx"), 0
        )
        return c


def count_data(job: Job, tokenizer: Any) -> DataCounts:
    """Tokenise every split and replay the teacher's shard chunks and batches."""
    from distill.config import splits

    c = DataCounts()
    for split, path in splits(job).items():
        count_split(c, job, split, path, tokenizer)
    return c


def count_split(c: DataCounts, job: Job, split: str, path: str | Path, tokenizer: Any) -> None:
    """Tokenise one split and replay the teacher's shard chunks and batches into ``c``."""
    from distill.teacher.batching import token_budget_batches, tokenize_split

    samples, st = tokenize_split(job, path, tokenizer)
    per = job.teacher.samples_per_shard
    padded = ctx = 0
    shard_tokens = []
    for lo in range(0, len(samples), per):
        lengths = [len(s.input_ids) for s in samples[lo : lo + per]]
        shard_tokens.append(sum(lengths))
        for batch in token_budget_batches(lengths, job.teacher.batch_tokens):
            longest = lengths[batch[0]]
            padded += len(batch) * longest
            ctx += len(batch) * longest * longest
    c.add_split(split, st.samples, st.tokens, st.target_tokens, padded, ctx, shard_tokens)


def total_flops(p: TeacherProfile, c: DataCounts) -> float:
    """Forward FLOPs of the whole pass (body on padded tokens, head on target rows only)."""
    body = 2 * p.non_embedding_params * c.padded_tokens
    attention = 2 * p.layers * p.q_dim * c.attention_token_ctx  # Kaplan et al. 2020, ctx = T_b
    head = 2 * p.hidden * p.vocab * c.target_tokens
    return float(body + attention + head)
