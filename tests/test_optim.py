"""Optimizer factory: offloaded AdamW matches plain AdamW, checkpoints, LR schedules, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from distill.errors import DistillError
from distill.student.optim import OffloadAdamW, build_optimizer

KW = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.95)}


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def train(
    m: torch.nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    start: int = 0,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=n)


def test_offload_matches_plain_adamw() -> None:
    a, b = model(), model()
    opt_a = build_optimizer(a.parameters(), "adamw", **KW)
    opt_b = build_optimizer(b.parameters(), "adamw", **KW, offload=True)
    assert type(opt_a) is torch.optim.AdamW and isinstance(opt_b, OffloadAdamW)
    train(a, opt_a, 5)
    train(b, opt_b, 5)
    assert_same(a, b)
    assert all(p.grad is not None for p in b.parameters())
    opt_b.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in b.parameters())
    assert all(t.device.type == "cpu" for s in opt_b.state.values() for t in s.values())


def test_param_groups_are_kept() -> None:
    m = model()
    decay, no_decay = [m[0].weight, m[2].weight], [m[0].bias, m[2].bias]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = build_optimizer(groups, "adamw", **KW, offload=True)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]


def lr_lambda(s: int) -> float:
    return 0.5 ** (s + 1)


@pytest.mark.parametrize("offload", [False, True])
def test_lambda_lr_drives_lr(offload: bool) -> None:
    m = model()
    opt = build_optimizer(m.parameters(), "adamw", **KW, offload=offload)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    assert opt.param_groups[0]["initial_lr"] == KW["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(KW["lr"] * 0.5)
    train(m, opt, 2, sched=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(KW["lr"] * 0.125)
    assert sched.get_last_lr()[0] == pytest.approx(KW["lr"] * 0.125)


@pytest.mark.parametrize(
    ("save_offload", "load_offload"), [(True, True), (False, True), (True, False)]
)
def test_checkpoint_round_trip_resumes_identically(save_offload: bool, load_offload: bool) -> None:
    # Uninterrupted: 6 steps with a schedule.
    ref = model()
    opt = build_optimizer(ref.parameters(), "adamw", **KW, offload=save_offload)
    train(ref, opt, 6, sched=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    # Killed after 3 steps, checkpointed through bytes, resumed as train.py does.
    m = model()
    opt = build_optimizer(m.parameters(), "adamw", **KW, offload=save_offload)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    train(m, opt, 3, sched=sched)
    buf = io.BytesIO()
    torch.save(
        {"model": m.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        buf,
    )
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    fresh = model(seed=1)  # different init: the optimizer must not keep stale master weights
    opt2 = build_optimizer(fresh.parameters(), "adamw", **KW, offload=load_offload)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda)
    fresh.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    train(fresh, opt2, 3, start=3, sched=sched2)
    assert_same(ref, fresh)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"] * 0.125)


def test_offload_rereads_params_loaded_after_the_optimizer() -> None:
    a, b = model(), model(seed=1)
    opt = build_optimizer(b.parameters(), "adamw", **KW, offload=True)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # after the optimizer was built
    train(a, build_optimizer(a.parameters(), "adamw", **KW), 2)
    train(b, opt, 2)
    assert_same(a, b)


def test_adamw8bit_needs_cuda_and_bitsandbytes() -> None:
    with pytest.raises(DistillError, match=r"8-bit AdamW needs a CUDA GPU and `pip install"):
        build_optimizer(model().parameters(), "adamw8bit", **KW)
    with pytest.raises(DistillError, match='use train.optimizer = "adamw"'):
        build_optimizer(model().parameters(), "adamw8bit", **KW)
    with pytest.raises(DistillError, match="offload"):
        build_optimizer(model().parameters(), "adamw8bit", **KW, offload=True)


def test_unknown_name_and_empty_params() -> None:
    with pytest.raises(DistillError, match="unknown optimizer 'sgd'"):
        build_optimizer(model().parameters(), "sgd", **KW)
    with pytest.raises(DistillError, match="no parameters"):
        build_optimizer([], "adamw", **KW)
