"""bench/quality.py helpers: full-vocab KL loss, held-out metrics, ECE, arms and jobs (no model)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from distill.config import LossWeights

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("w_kl", "w_ce"), [(1.0, 0.0), (0.7, 0.3)])
def test_full_kl_loss_matches_dense_reference(quality, w_kl: float, w_ce: float) -> None:
    g = torch.Generator().manual_seed(0)
    n, h, v = 7, 8, 50
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(n, 6, generator=g, dtype=torch.float64)
    t_weight = torch.randn(v, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    weights = LossWeights(forward_kl=w_kl, ce=w_ce)
    loss, terms = quality.full_kl_loss(hidden, weight, t_hidden, t_weight, labels, weights, 3)
    (2.0 * loss).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    log_q = torch.log_softmax(hidden @ weight.T, -1)
    log_p = torch.log_softmax(t_hidden @ t_weight.T, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = -log_q.gather(1, labels[:, None]).squeeze(1)
    ref = (w_kl * kl + w_ce * ce).mean()
    (2.0 * ref).backward()
    assert torch.allclose(loss, ref)
    assert torch.allclose(terms["forward_kl"], kl.mean())
    assert ("ce" in terms) == (w_ce > 0)
    assert torch.allclose(gh, hidden.grad)
    assert torch.allclose(gw, weight.grad)


def test_ece_by_hand(quality) -> None:
    conf = torch.tensor([0.95, 0.95, 0.55, 0.5, 1.0 / 15])
    correct = torch.tensor([True, False, True, True, False])
    # bins: 0.95 -> 15th (acc 0.5, conf 0.95); 0.55 and 0.5 -> 8th (8/15 = 0.533...: 0.5 is
    # in (7/15, 8/15], 0.55 in (8/15, 9/15]) -> separate; 1/15 -> the first bin
    expected = (2 * abs(0.5 - 0.95) + abs(1 - 0.55) + abs(1 - 0.5) + abs(0 - 1 / 15)) / 5
    assert quality.expected_calibration_error(conf, correct) == pytest.approx(expected)
    assert quality.expected_calibration_error(torch.tensor([1.0]), torch.tensor([True])) == 0.0


def test_heldout_metrics(quality) -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.randn(20, 30, generator=g)
    s = torch.randn(20, 30, generator=g)
    labels = torch.randint(0, 30, (20,), generator=g)
    same = quality.HeldOutMetrics()
    same.add(t, t, labels)
    r = same.result()
    assert r["heldout_kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["top1_agreement"] == 1.0
    acc = quality.HeldOutMetrics()
    acc.add(s[:7], t[:7], labels[:7])  # chunks add up to the whole
    acc.add(s[7:], t[7:], labels[7:])
    r = acc.result()
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    assert r["heldout_kl"] == pytest.approx(float(kl), rel=1e-5)
    ce = -log_q.gather(1, labels[:, None]).mean()
    assert r["heldout_ce"] == pytest.approx(float(ce), rel=1e-5)
    agree = (s.argmax(-1) == t.argmax(-1)).float().mean()
    assert r["top1_agreement"] == pytest.approx(float(agree))
    conf, pred = log_q.exp().max(-1)
    assert r["ece"] == pytest.approx(quality.expected_calibration_error(conf, pred == labels))
    assert r["heldout_positions"] == 20


def test_gap_closed(quality) -> None:
    assert quality.gap_closed(2.0, 2.0, 1.0) == 0.0
    assert quality.gap_closed(2.0, 1.0, 1.0) == 1.0
    assert quality.gap_closed(2.0, 1.05, 1.0) == pytest.approx(0.95)
    assert math.isnan(quality.gap_closed(1.0, 1.0, 1.0))


def test_arm_names(quality) -> None:
    a = quality.parse_arm("topk8+sample-42-sys", 0.0)
    assert a.targets == {"kind": "topk+sample", "k": 8, "draws": 42, "sampling": "systematic"}
    assert quality.parse_arm("sample-50", 0.0).targets == {
        "kind": "sample",
        "draws": 50,
        "sampling": "iid",
    }
    assert quality.parse_arm("sample-32-sys", 0.0).targets["sampling"] == "systematic"
    assert quality.parse_arm("full-online", 0.0).online
    with pytest.raises(ValueError, match="unknown arm 'topk'"):
        quality.parse_arm("topk", 0.0)
    with pytest.raises(SystemExit):
        quality.parse_args(["--arms", "ce-only,full-online"])  # no shard set to train from


def test_arms_and_jobs(quality, tmp_path: Path) -> None:
    names = ["ce-only", "topk-8", "topk-64", "sample-50", "full-online"]
    arms = quality.make_arms(names, 0.1)
    assert [a.name for a in arms] == names
    assert arms[0].loss == {"forward_kl": 0.0, "ce": 1.0}
    assert all(a.loss == {"forward_kl": 0.9, "ce": 0.1} for a in arms[1:])
    args = quality.parse_args(["--quick", "--workdir", str(tmp_path)])
    args.workdir = tmp_path
    base = quality.base_job(args, tmp_path / "init")
    jobs = {a.name: quality.arm_job(base, a, a.targets or arms[1].targets, tmp_path) for a in arms}
    # ce-only and full-online read the topk-8 shard set; every kind has its own
    assert jobs["ce-only"].output == jobs["topk-8"].output == jobs["full-online"].output
    assert len({j.output for j in jobs.values()}) == 3
    assert len({j.train.run_dir for j in jobs.values()}) == 5
    assert jobs["sample-50"].targets.spec().tail is False
    for j in jobs.values():
        assert (j.train.max_steps, j.train.batch_size, j.seed) == (10, 2, 0)
        assert j.data.max_samples == 32


def test_online_kd_injects_its_components_and_patches_nothing(quality) -> None:
    """The online arm's body and loss are passed to ``train(job, components)``; the training
    module keeps its own (the defaults every other arm and ``distill-ctl train`` use)."""
    from distill.student import train as dtrain

    body, loss = dtrain.StudentBody, dtrain.chunked_distill_loss
    teacher = torch.nn.Module()
    teacher.get_output_embeddings = lambda: torch.nn.Linear(2, 3, bias=False)
    components, stats = quality.online_kd(teacher, 4)
    assert components.body is not body and issubclass(components.body, body)
    assert components.loss is not loss
    assert dtrain.StudentBody is body and dtrain.chunked_distill_loss is loss
    assert dtrain.Components() == dtrain.Components(body=body, loss=loss)
    assert (stats.calls, stats.teacher_seconds) == (0, 0.0)
