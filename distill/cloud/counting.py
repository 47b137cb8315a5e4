"""The job's dataset as the teacher will batch it: tokens, targets, padding and attention
context, counted with the teacher's own tokenizer (:func:`count_data`), and the pass's FLOPs.

Only :func:`count_data` tokenises; :class:`DataCounts` may be built by hand (bench/fanout.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.config import Job
from distill.teacher.fit import TeacherProfile


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


def count_data(job: Job, tokenizer: Any) -> DataCounts:
    """Tokenise every split and replay the teacher's shard chunks and batches."""
    from distill.config import splits
    from distill.teacher.batching import token_budget_batches, tokenize_split

    c = DataCounts()
    for split, path in splits(job).items():
        samples, st = tokenize_split(job, path, tokenizer)
        per = job.teacher.samples_per_shard
        padded = ctx = 0
        c.shard_tokens[split] = []
        for lo in range(0, len(samples), per):
            lengths = [len(s.input_ids) for s in samples[lo : lo + per]]
            c.shard_tokens[split].append(sum(lengths))
            for batch in token_budget_batches(lengths, job.teacher.batch_tokens):
                longest = lengths[batch[0]]
                padded += len(batch) * longest
                ctx += len(batch) * longest * longest
        c.samples += st.samples
        c.shards += -(-len(samples) // per)
        c.tokens += st.tokens
        c.target_tokens += st.target_tokens
        c.padded_tokens += padded
        c.attention_token_ctx += ctx
        c.per_split[split] = {
            "samples": st.samples,
            "tokens": st.tokens,
            "target_tokens": st.target_tokens,
            "padded_tokens": padded,
        }
    return c


def total_flops(p: TeacherProfile, c: DataCounts) -> float:
    """Forward FLOPs of the whole pass (body on padded tokens, head on target rows only)."""
    body = 2 * p.non_embedding_params * c.padded_tokens
    attention = 2 * p.layers * p.q_dim * c.attention_token_ctx  # Kaplan et al. 2020, ctx = T_b
    head = 2 * p.hidden * p.vocab * c.target_tokens
    return float(body + attention + head)
