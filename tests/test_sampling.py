"""The sampled data counts' arithmetic without a tokenizer: the line pass, the uniform sample,
the extrapolation and its 95% bound, the sample's own batches and the shard sizes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from distill.cloud import sampling
from distill.cloud.counting import DataCounts, SplitSample
from distill.cloud.sampling import extrapolate, padded_rows, scan_lines, shard_sizes
from distill.teacher.batching import token_budget_batches


def test_extrapolate_is_lines_times_the_mean_with_the_srs_bound():
    # mean 2.5, s^2 = 5/3, n = 4 of N = 10: 1.96 x 10 x sqrt(0.6 x (5/3) / 4) = 9.8
    total, half = extrapolate(np.array([1.0, 2.0, 3.0, 4.0]), 10)
    assert (total, half) == (25, 10)
    assert extrapolate(np.array([1.0, 2.0, 3.0, 4.0]), 4) == (10, 0)  # every line: exact
    assert extrapolate(np.ones(50), 1000) == (1000, 0)  # no variance: no bound


def test_the_bound_covers_95_percent_of_samples():
    """The stated 95% interval, checked: uniform samples of a skewed population of per-line
    token counts (mostly short, a long tail) hold the true total ~95% of the time."""
    rng = np.random.default_rng(1)
    population = np.minimum(rng.lognormal(4.0, 0.9, 20_000).round(), 4096)
    truth = population.sum()
    hits = 0
    for _ in range(2000):
        total, half = extrapolate(rng.choice(population, 400, replace=False), len(population))
        hits += abs(total - truth) <= half
    assert 0.93 <= hits / 2000 <= 0.97


def write_lines(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_bytes(end.join(lines).encode())
    return path


@pytest.mark.parametrize("block", [1, 7, 64, 8 * 2**20])
def test_the_line_pass_counts_and_places_non_blank_lines(tmp_path, monkeypatch, block):
    """Blank and whitespace-only lines are not lines (read_jsonl skips them) but keep the
    numbering; CRLF, a last line without a newline and any block size are handled."""
    monkeypatch.setattr(sampling, "BLOCK", block)
    lines = ['{"a": 1}', "", "  \t", '{"b": 22}\r', '  {"c": 3}', "", "x", '{"d": 4}']
    p = write_lines(tmp_path / "d.jsonl", lines)  # no newline after the last line
    scan = scan_lines(p, 100)
    assert (scan.lines, scan.nbytes) == (5, p.stat().st_size)
    seen = sorted(zip(scan.ranks.tolist(), scan.numbers.tolist(), strict=True))
    assert seen == [(0, 1), (1, 4), (2, 5), (3, 7), (4, 8)]
    raw = p.read_bytes()
    for off, size, num in zip(scan.offsets, scan.sizes, scan.numbers, strict=True):
        assert raw[off : off + size].rstrip(b"\n") == lines[num - 1].encode()
    # data.max_samples: the population is the first lines only
    first = scan_lines(p, 100, max_lines=2)
    assert (first.lines, sorted(first.numbers.tolist())) == (2, [1, 4])
    assert first.nbytes == len("\n".join(lines[:4])) + 1


def test_the_sample_is_uniform_seeded_and_bounded(tmp_path, monkeypatch):
    p = write_lines(tmp_path / "d.jsonl", [f'{{"i": {i}}}' for i in range(50_000)], end="\n")
    scan = scan_lines(p, 2000)
    assert scan.lines == 50_000 and len(scan.keys) == 2000
    assert len(set(scan.ranks.tolist())) == 2000 and np.all(np.diff(scan.keys) > 0)
    # uniform over the file: each tenth holds ~200 of the 2000 (binomial sd ~13)
    per_tenth = np.bincount(scan.ranks // 5000, minlength=10)
    assert per_tenth.min() > 150 and per_tenth.max() < 250
    # the same seed draws the same lines whatever the block size; another seed others
    monkeypatch.setattr(sampling, "BLOCK", 4096)
    assert np.array_equal(scan_lines(p, 2000).ranks, scan.ranks)
    assert not np.array_equal(scan_lines(p, 2000, seed=1).ranks, scan.ranks)
    # a byte cap keeps the lowest keys (itself a uniform sample), in file order
    idx = scan.take(100 * 13)  # the lines are 12-13 bytes
    assert 100 <= len(idx) <= 109 and np.all(np.diff(scan.offsets[idx]) > 0)
    assert set(idx.tolist()) == set(range(len(idx)))
    assert len(scan.take(1)) == sampling.MIN_SAMPLE_LINES


def test_padded_rows_replay_the_teachers_batches_per_shard():
    lengths = np.array([10, 300, 290, 12, 11, 280, 50, 49, 48, 47])
    rows = padded_rows(lengths, 4, 600)
    padded = ctx = 0
    for lo in range(0, 10, 4):
        chunk = lengths[lo : lo + 4].tolist()
        for b in token_budget_batches(chunk, 600):
            padded += len(b) * chunk[b[0]]
            ctx += len(b) * chunk[b[0]] ** 2
    assert rows.sum() == padded and (rows**2).sum() == ctx
    assert rows[1] == rows[2] == 300  # 290 rides in 300's batch (>= 90% of it)


def test_shard_sizes_follow_the_file_and_sum_to_the_tokens():
    """Sampled samples of a file sorted by length: early shards come out short, late ones long;
    the sizes add up to the split's tokens and there is one per shard."""
    lines, per = 10_000, 100
    ranks = np.arange(0, lines, 10)  # a sample of every tenth line
    lengths = 10.0 + ranks / 100  # 10 tokens at the start, ~110 at the end
    tokens = int(lines * lengths.mean())
    sizes = shard_sizes(lines, per, tokens, ranks, lengths, lines)
    assert len(sizes) == 100 and abs(sum(sizes) - tokens) <= len(sizes)
    assert sizes[0] < 2_000 and sizes[-1] > 10_000  # per x ~15, per x ~105
    assert shard_sizes(250, 100, 5000, ranks[:3], lengths[:3], 250)[2] < 2500  # 50 samples
    assert shard_sizes(0, 100, 0, ranks[:0], lengths[:0], 0) == []


def test_bounds_add_in_quadrature_and_move_the_counts():
    c = DataCounts()
    c.add_split("train", 1000, 50_000, 20_000, 52_000, 5_000_000, [25_000, 25_000])
    c.add_split("eval", 100, 5_000, 2_000, 5_200, 500_000, [5_000])
    bounds = {"samples": 0, "tokens": 3000, "target_tokens": 1200, "padded_tokens": 3100}
    c.sampled["train"] = SplitSample(1000, 200, 0, 1.04, {**bounds, "attention_token_ctx": 0})
    c.sampled["eval"] = SplitSample(
        100, 20, 0, 1.04, {**bounds, "tokens": 4000, "attention_token_ctx": 40_000}
    )
    assert not c.exact and c.bound("tokens") == 5000 and c.bound("samples") == 0
    assert c.bound("padded_tokens") == math.ceil(3100 * math.sqrt(2))
    hi, lo = c.at_bound(1), c.at_bound(-1)
    assert (hi.tokens, lo.tokens) == (55_000 + 7000, 55_000 - 7000)
    assert hi.per_split["train"]["padded_tokens"] == 55_100 and hi.samples == c.samples
    assert hi.shard_tokens["train"] == [26_500, 26_500] and hi.shards == 3
    assert lo.attention_token_ctx == 5_500_000 - 40_000
    assert DataCounts().exact and DataCounts().bound("tokens") == 0
