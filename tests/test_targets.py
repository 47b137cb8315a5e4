"""Target kinds against dense references, determinism, unbiasedness of sampled targets, the
tail-free loss, and bad combinations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.config import LossWeights, job_from_dict
from distill.errors import DistillError
from distill.format.spec import TargetSpec
from distill.student.losses import chunked_distill_loss, sparse_distill_terms
from distill.teacher.extract import (
    draw_uniforms,
    extract,
    sample_targets,
    systematic_uniforms,
    topk_sample_targets,
    topk_targets,
    topp_targets,
)

V = 60


def logits(rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g, dtype=torch.float64).float() * scale


def uniforms(rows: int, draws: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(draw_uniforms(seed, "test-0000001", rows, draws))


def row_entries(ids: torch.Tensor, values: torch.Tensor) -> list[dict[int, float]]:
    """Per row {id: value} over the real (finite) entries."""
    return [
        {int(i): float(v) for i, v in zip(r_ids, r_vals, strict=True) if v > float("-inf")}
        for r_ids, r_vals in zip(ids, values, strict=True)
    ]


def test_topk_equals_dense_reference():
    z = logits(7)
    t = topk_targets(z, 5)
    lp = z.double().log_softmax(-1)
    ref = lp.topk(5, -1)
    assert torch.equal(t.ids, ref.indices) and t.n.tolist() == [5] * 7
    torch.testing.assert_close(t.values.double(), ref.values, atol=1e-5, rtol=0)
    assert int(t.counts.abs().sum()) == 0


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95, 1.0])
def test_topp_is_the_smallest_prefix_reaching_p_capped_at_k(top_p):
    z = logits(20, seed=1)
    k = 12
    t = topp_targets(z, top_p, k)
    lp = z.double().log_softmax(-1)
    srt, order = lp.sort(-1, descending=True)
    for r in range(20):
        cum = srt[r].exp().cumsum(0)
        want = min(int((cum < top_p).sum()) + 1, k)
        n = int(t.n[r])
        assert n == want
        assert t.ids[r, :n].tolist() == order[r, :n].tolist()
        torch.testing.assert_close(t.values[r, :n].double(), srt[r, :n], atol=1e-5, rtol=0)
        # padding sentinel: the row's first id, -inf, count 0
        assert (t.ids[r, n:] == t.ids[r, 0]).all() and torch.isinf(t.values[r, n:]).all()
    assert t.values.shape == (20, k)


def _dense_draw(z: torch.Tensor, u: torch.Tensor) -> list[dict[int, int]]:
    """Reference: numpy inverse-CDF draws and np.unique counts, row by row."""
    p = torch.softmax(z.float(), -1).double().numpy()
    out = []
    for r in range(p.shape[0]):
        cdf = np.cumsum(p[r])
        idx = np.minimum(np.searchsorted(cdf, u[r].numpy() * cdf[-1], side="right"), p.shape[1] - 1)
        ids, counts = np.unique(idx, return_counts=True)
        out.append(dict(zip(ids.tolist(), counts.tolist(), strict=True)))
    return out


def test_sample_equals_dense_reference_and_is_a_distribution():
    z = logits(9, seed=2)
    n_draws = 40
    u = uniforms(9, n_draws)
    t = sample_targets(z, n_draws, u)
    ref = _dense_draw(z, u)
    assert t.ids.shape == (9, n_draws)
    for r in range(9):
        n = int(t.n[r])
        got = dict(zip(t.ids[r, :n].tolist(), t.counts[r, :n].tolist(), strict=True))
        assert got == ref[r]
        assert (t.counts[r, :n] > 0).all() and int(t.counts[r, n:].sum()) == 0
        assert torch.isinf(t.values[r, n:]).all() and (t.ids[r, n:] == t.ids[r, 0]).all()
        torch.testing.assert_close(
            t.values[r, :n].double(), (t.counts[r, :n].double() / n_draws).log()
        )
        assert abs(float(t.values[r, :n].double().exp().sum()) - 1.0) < 1e-6
        assert t.counts[r, :n].tolist() == sorted(t.counts[r, :n].tolist(), reverse=True)


def test_topk_plus_sample_is_exact_head_plus_scaled_tail_draws():
    z = logits(6, seed=3)
    k, n_draws = 4, 30
    u = uniforms(6, n_draws)
    t = topk_sample_targets(z, k, n_draws, u)
    head = topk_targets(z, k)
    assert torch.equal(t.ids[:, :k], head.ids) and torch.equal(t.values[:, :k], head.values)
    lp = z.double().log_softmax(-1)
    rest = z.scatter(1, head.ids, float("-inf"))
    ref = _dense_draw(rest, u)
    for r in range(6):
        n = int(t.n[r])
        tail_ids, tail_c = t.ids[r, k:n].tolist(), t.counts[r, k:n].tolist()
        assert dict(zip(tail_ids, tail_c, strict=True)) == ref[r]
        assert not set(tail_ids) & set(head.ids[r].tolist())
        log_tail = torch.logsumexp(lp[r][rest[r] > float("-inf")], 0)
        want = (torch.tensor(tail_c).double() / n_draws).log() + log_tail
        torch.testing.assert_close(t.values[r, k:n].double(), want, atol=1e-5, rtol=0)
        assert abs(float(t.values[r, :n].double().exp().sum()) - 1.0) < 1e-5


@pytest.mark.parametrize(
    ("kind", "sampling"),
    [("topk", "iid"), ("topp", "iid"), ("sample", "iid"), ("topk+sample", "iid")]
    + [("sample", "systematic"), ("topk+sample", "systematic")],
)
def test_extraction_is_deterministic_and_chunking_does_not_matter(kind, sampling):
    spec = TargetSpec(kind=kind, k=5, top_p=0.9, draws=25, sampling=sampling)
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(23, 8, generator=g), torch.randn(V, 8, generator=g) * 2
    u = np.concatenate(
        [draw_uniforms(7, "a-0000001", 10, 25), draw_uniforms(7, "a-0000002", 13, 25)]
    )
    a = extract(hidden, weight, spec, 64, u if spec.sampled else None)
    b = extract(hidden, weight, spec, 3, u.copy() if spec.sampled else None)
    # The selection is exact; the log-probs come from matmuls of other shapes, which another
    # BLAS kernel may round differently (seen on AMD EPYC vs Intel Xeon): a float32 tolerance.
    for f in ("ids", "counts", "n"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
    assert a.ids.shape == (23, spec.width)


def test_draw_uniforms_depend_only_on_seed_and_key():
    a = draw_uniforms(3, "train-0000005", 4, 10)
    assert np.array_equal(a, draw_uniforms(3, "train-0000005", 4, 10))
    assert np.array_equal(a[:2], draw_uniforms(3, "train-0000005", 2, 10))
    assert not np.array_equal(a, draw_uniforms(4, "train-0000005", 4, 10))
    assert not np.array_equal(a, draw_uniforms(3, "train-0000006", 4, 10))
    assert a.min() >= 0 and a.max() < 1


# --- systematic sampling ------------------------------------------------------------------


def test_systematic_draws_equal_a_dense_reference_and_give_floor_or_ceil_counts():
    """u_j = (j + U) / N: the counts equal numpy's inverse-CDF draws at those points, and id
    i gets floor(N p_i) or ceil(N p_i) draws (so every id with p_i >= 1/N is kept)."""
    z = logits(9, seed=20)
    n_draws = 40
    u = uniforms(9, n_draws)
    t = sample_targets(z, n_draws, u, "systematic")
    points = (torch.arange(n_draws, dtype=torch.float64)[None] + u[:, :1]) / n_draws
    torch.testing.assert_close(systematic_uniforms(u), points, rtol=0, atol=0)
    ref = _dense_draw(z, points)
    p = torch.softmax(z.float(), -1).double()
    for r in range(9):
        n = int(t.n[r])
        got = dict(zip(t.ids[r, :n].tolist(), t.counts[r, :n].tolist(), strict=True))
        assert got == ref[r] and sum(got.values()) == n_draws
        c = torch.zeros(V, dtype=torch.float64)
        c[list(got)] = torch.tensor(list(got.values()), dtype=torch.float64)
        np_i = n_draws * p[r]
        assert bool(((c >= np_i.floor() - 1e-9) & (c <= np_i.ceil() + 1e-9)).all())
        want = (t.counts[r, :n].double() / n_draws).log()
        torch.testing.assert_close(t.values[r, :n].double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["sample", "topk+sample"])
def test_systematic_targets_are_unbiased_with_less_variance_than_iid(kind):
    """E_U[p_hat] = p exactly: averaged over an even grid of M offsets U, each id's mean
    estimate is within 2 / (N M) of its full-softmax probability (count_i(U) is a step
    function with at most two steps). iid draws at the same budget vary several times more."""
    z = logits(3, seed=21, scale=2.0)
    n_draws, grid = 20, 4000
    p = torch.softmax(z.double(), -1)
    spec = TargetSpec(kind, k=3, draws=n_draws, sampling="systematic")
    rows = z.repeat_interleave(grid, 0)
    u_grid = ((torch.arange(grid, dtype=torch.float64) + 0.5) / grid).repeat(3)
    t = extract(rows, torch.eye(V), spec, 4096, u_grid[:, None].expand(-1, n_draws).contiguous())
    p_hat = _dense_p(t.ids, t.values).view(3, grid, V)
    assert float((p_hat.mean(1) - p).abs().max()) <= 2 / (n_draws * grid) + 1e-6
    rng = np.random.default_rng(0)
    iid = extract(
        rows,
        torch.eye(V),
        TargetSpec(kind, k=3, draws=n_draws),
        4096,
        rng.random((3 * grid, n_draws)),
    )
    var_sys = p_hat.var(1).sum()
    var_iid = _dense_p(iid.ids, iid.values).view(3, grid, V).var(1).sum()
    assert float(var_sys) < float(var_iid) / 3


def test_sampling_is_part_of_the_targets_info_and_fingerprint():
    sys_job = job_from_dict({"targets": {"kind": "sample", "sampling": "systematic"}})
    iid_job = job_from_dict({"targets": {"kind": "sample", "sampling": "iid"}})
    assert sys_job.targets.spec().info()["sampling"] == "systematic"
    assert iid_job.targets.spec().info()["sampling"] == "iid"
    assert sys_job.targets.fingerprint() != iid_job.targets.fingerprint()
    topk = job_from_dict({"targets": {"kind": "topk", "sampling": "systematic"}})
    assert "sampling" not in topk.targets.spec().info()  # no draws: nothing to sample
    with pytest.raises(DistillError, match="targets.sampling = 'sobol' is not one of"):
        job_from_dict({"targets": {"kind": "sample", "sampling": "sobol"}}, "job.toml")


# --- the tail-free loss --------------------------------------------------------------------


def _dense_p(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Scatter-add exp(values) into [n, V] (padding adds 0)."""
    return torch.zeros(ids.shape[0], V, dtype=torch.float64).scatter_add_(
        1, ids, values.double().exp()
    )


def _dense_terms(z: torch.Tensor, p: torch.Tensor, beta: float = 0.5) -> dict[str, torch.Tensor]:
    log_q = z.log_softmax(-1)
    q = log_q.exp()
    lp = torch.where(p > 0, p.log(), 0.0)
    fkl = torch.where(p > 0, p * (lp - log_q), 0.0).sum(-1)
    m = beta * p + (1 - beta) * q
    kl_pm = torch.where(p > 0, p * (lp - m.log()), 0.0).sum(-1)
    kl_qm = (q * (log_q - m.log())).sum(-1)
    return {
        "forward_kl": fkl,
        "jsd": beta * kl_pm + (1 - beta) * kl_qm,
        "tvd": 0.5 * (p - q).abs().sum(-1),
    }


@pytest.mark.parametrize("sampling", ["iid", "systematic"])
@pytest.mark.parametrize("kind", ["sample", "topk+sample"])
def test_tail_free_terms_equal_full_vocab_divergences_to_p_hat(kind, sampling):
    """tail=False: the bucket terms are the full-vocab divergences between p_hat and q, in
    value and in gradient (forward KL = CE against p_hat minus its entropy)."""
    spec = TargetSpec(kind=kind, k=3, draws=20, sampling=sampling)
    t = extract(logits(11, seed=5), torch.eye(V), spec, 64, uniforms(11, 20))  # rows = logits
    z = logits(11, seed=6).double().requires_grad_()
    labels = torch.zeros(11, dtype=torch.long)
    names = ("forward_kl", "jsd", "tvd")
    got = sparse_distill_terms(z, t.ids, t.values, labels, names, tail=False)
    p = _dense_p(t.ids, t.values)
    ref = _dense_terms(z, p)
    for name in names:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-6, msg=name)
        g1 = torch.autograd.grad(got[name].sum(), z, retain_graph=True)[0]
        g2 = torch.autograd.grad(ref[name].sum(), z, retain_graph=True)[0]
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-6, msg=name)
    # forward KL gradient is q - p_hat over the full vocab
    g = torch.autograd.grad(got["forward_kl"].sum(), z)[0]
    torch.testing.assert_close(g, z.detach().softmax(-1) - p, atol=1e-6, rtol=1e-5)


def test_chunked_tail_free_loss_matches_dense_reference_in_hidden_and_weight():
    spec = TargetSpec(kind="sample", draws=16)
    g = torch.Generator().manual_seed(8)
    t = extract(logits(13, seed=9), torch.eye(V), spec, 64, uniforms(13, 16))
    hidden = torch.randn(13, 10, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, 10, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, V, (13,), generator=g)
    w = LossWeights(forward_kl=0.7, ce=0.3)
    loss, terms = chunked_distill_loss(hidden, weight, t.ids, t.values, labels, w, 4, tail=False)
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    z = h2 @ w2.T
    ref_kd = _dense_terms(z, _dense_p(t.ids, t.values))["forward_kl"]
    ref_ce = torch.nn.functional.cross_entropy(z, labels, reduction="none")
    ref = (0.7 * ref_kd + 0.3 * ref_ce).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(terms["forward_kl"], ref_kd.mean())
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)
    with pytest.raises(DistillError, match="reverse_kl needs a tail bucket"):
        chunked_distill_loss(
            hidden, weight, t.ids, t.values, labels, LossWeights(reverse_kl=1.0), tail=False
        )


def test_padding_is_absent_from_every_term():
    """topp rows padded to k give the same per-row terms as the unpadded rows."""
    z_t = logits(10, seed=10)
    t = topp_targets(z_t, 0.7, 9)
    z = logits(10, seed=11).double()
    labels = torch.zeros(10, dtype=torch.long)
    names = ("forward_kl", "reverse_kl", "jsd", "tvd", "ce")
    padded = sparse_distill_terms(z, t.ids, t.values, labels, names)
    assert int(t.n.min()) < 9  # some rows really are padded
    for r in range(10):
        n = int(t.n[r])
        one = sparse_distill_terms(
            z[r : r + 1], t.ids[r : r + 1, :n], t.values[r : r + 1, :n], labels[:1], names
        )
        for name in names:
            torch.testing.assert_close(padded[name][r : r + 1], one[name], msg=name)
    zz = z.clone().requires_grad_()
    total = sum(v.sum() for v in sparse_distill_terms(zz, t.ids, t.values, labels, names).values())
    (grad,) = torch.autograd.grad(total, zz)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("sampling", ["iid", "systematic"])
def test_sampled_gradient_is_unbiased_for_the_full_forward_kl_gradient(sampling):
    """Averaged over many independent draws, the gradient of the tail-free sampled forward
    KL w.r.t. the student's logits converges to the full-distribution gradient q - p; the
    top-k + tail-bucket target with the same budget does not."""
    z_t = logits(1, seed=12, scale=2.0)
    p = z_t.double().softmax(-1)[0]
    z_s = logits(1, seed=13, scale=1.0).double()
    q = z_s.softmax(-1)[0]
    full = q - p  # d KL(p || q) / d z
    seeds, n_draws = 4000, 50
    rows = z_t.expand(seeds, V)
    u = torch.from_numpy(np.random.default_rng(0).random((seeds, n_draws)))
    labels = torch.zeros(seeds, dtype=torch.long)
    for t in (
        sample_targets(rows, n_draws, u, sampling),
        topk_sample_targets(rows, 5, n_draws, u, sampling),
    ):
        zz = z_s.expand(seeds, V).clone().requires_grad_()
        fkl = sparse_distill_terms(zz, t.ids, t.values, labels, ("forward_kl",), tail=False)
        (g,) = torch.autograd.grad(fkl["forward_kl"].sum(), zz)
        mean, se = g.mean(0), g.std(0) / seeds**0.5
        assert float(((mean - full).abs() - 5 * se).max()) < 1e-4, (mean - full).abs().max()
        assert float((mean - full).abs().max()) < 0.01
    # contrast: top-k with a tail bucket is biased (the tail's gradient is spread as q_j / q_tail)
    t = topk_targets(rows[:1], 5)
    zz = z_s.clone().requires_grad_()
    fkl = sparse_distill_terms(zz, t.ids, t.values, labels[:1], ("forward_kl",))
    (g,) = torch.autograd.grad(fkl["forward_kl"].sum(), zz)
    assert float((g[0] - full).abs().max()) > 0.01


# --- bad combinations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"targets": {"kind": "bogus"}}, "targets.kind = 'bogus' is not one of"),
        ({"targets": {"kind": "topp", "top_p": 0.0}}, r"targets.top_p must be in \(0, 1\]"),
        ({"targets": {"kind": "topp", "top_p": 1.5}}, r"targets.top_p must be in \(0, 1\]"),
        ({"targets": {"kind": "sample", "draws": 0}}, r"targets.draws must be in \[1, 65535\]"),
        ({"targets": {"k": 70000}}, r"targets.k must be in \[1, 65535\]"),
        ({"targets": {"codec": "gzip"}}, "targets.codec = 'gzip' is not one of"),
        ({"targets": {"codec": "packed", "values": "log4"}}, "targets.values = 'log4'"),
        (
            {"targets": {"codec": "npz"}},
            'job.toml: targets.codec = "npz" is no longer written .* use targets.codec = "packed"',
        ),
        ({"targets": {"codec": "npz", "codec_version": 1}}, 'targets.codec = "npz" is no longer'),
        (
            {"targets": {"codec_version": 1}},
            "targets.codec_version = 1 .* is no longer written .* use targets.codec_version = 0",
        ),
        ({"targets": {"codec_version": 3}}, "codec_version = 3 is not one of 0, 2"),
        (
            {"targets": {"block_tokens": 0}},
            r"targets.block_tokens must be in \[1, 16777216\], got 0",
        ),
        ({"targets": {"kind": "sample"}, "loss": {"bild": 0.1}}, "loss.bild needs targets.kind"),
        ({"targets": {"kind": "topp"}, "loss": {"bild": 0.1}}, "loss.bild needs targets.kind"),
        ({"targets": {"kind": "topk+sample"}, "loss": {"reverse_kl": 0.1}}, "loss.reverse_kl"),
        ({"targets": {"kind": "sample", "draws": 1.5}}, "targets.draws: expected int"),
    ],
)
def test_bad_target_settings_name_the_field(raw, match):
    with pytest.raises(DistillError, match=match):
        job_from_dict(raw, "job.toml")


def test_k_must_be_below_the_vocab_and_good_settings_load():
    with pytest.raises(
        DistillError, match=r"targets.k = 60 must be smaller than the teacher vocab \(60\)"
    ):
        TargetSpec(kind="topp", k=60).check(V)
    TargetSpec(kind="sample", k=60, draws=500).check(V)  # k unused by sample: fine
    job = job_from_dict(
        {"targets": {"kind": "topk+sample", "k": 8, "draws": 64, "codec": "packed", "zstd": True}}
    )
    assert job.targets.spec().info() == {
        "kind": "topk+sample",
        "k": 8,
        "draws": 64,
        "sampling": "systematic",
        "tail": False,
        "width": 72,
    }
    assert job.targets.codec_spec().info()["zstd"] is True
    # the default: 50 systematic draws, packed v2 blocks with zstd
    d = job_from_dict({}).targets
    assert d.spec() == TargetSpec("sample", draws=50, sampling="systematic")
    assert d.codec_spec().info()["version"] == 2 and d.codec_spec().zstd


# --- end to end: a sampled, packed shard set is reproducible and trains --------------------


def test_teacher_sample_packed_is_reproducible_and_trains(tiny_teacher_dir, tmp_path):
    from helpers import make_job

    from distill.config import load_job
    from distill.format.manifest import MANIFEST, Manifest
    from distill.format.shards import read_shard
    from distill.student.train import train
    from distill.teacher.run import run_teacher

    path = make_job(
        tmp_path,
        tiny_teacher_dir,
        str(tmp_path / "o"),
        n_train=32,
        targets__kind='"sample"',
        targets__draws="20",
        targets__codec='"packed"',
        train__epochs="1",
    )
    job = load_job(path)
    run_teacher(job)
    m = Manifest.from_json((tmp_path / "o" / "train" / MANIFEST).read_bytes(), "m")
    assert m.codec["name"] == "packed" and m.targets["kind"] == "sample" and m.tail is False
    first = [s.sha256 for s in m.shards]
    samples = [s for sh in m.shards for s in read_shard(tmp_path / "o" / "train" / sh.name, 49152)]
    for s in samples:
        c = s.target_counts.astype(np.int64)
        assert (c.sum(1) == 20).all() and s.target_ids.shape[1] == 20
    # a rerun from scratch writes byte-identical shards (resume relies on it)
    import shutil

    shutil.rmtree(tmp_path / "o")
    run_teacher(load_job(path))
    m2 = Manifest.from_json((tmp_path / "o" / "train" / MANIFEST).read_bytes(), "m")
    assert [s.sha256 for s in m2.shards] == first
    # a shard without its sidecar is re-verified through decode -> encode (same bytes)
    (tmp_path / "o" / "train" / MANIFEST).unlink()
    (tmp_path / "o" / "train" / "shard-000001.json").unlink()
    run_teacher(load_job(path))
    m3 = Manifest.from_json((tmp_path / "o" / "train" / MANIFEST).read_bytes(), "m")
    assert [s.sha256 for s in m3.shards] == first
    summary = train(load_job(path, ["loss.ce=0.5", "loss.forward_kl=0.5"]))
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
