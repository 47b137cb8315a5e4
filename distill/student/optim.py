"""Optimizer levers behind one factory: AdamW, 8-bit AdamW, and AdamW with CPU offload.

Every optimizer returned is a ``torch.optim.Optimizer``, so ``LambdaLR`` and checkpointing
(``state_dict``/``load_state_dict``) work unchanged. The state dicts of ``adamw`` and of
``adamw`` with ``offload=True`` are interchangeable (same index-based layout).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from typing import Any

import torch

from distill.config import OPTIMIZERS
from distill.errors import DistillError

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

_NEEDS_BNB = (
    '8-bit AdamW needs a CUDA GPU and `pip install bitsandbytes`; use train.optimizer = "adamw"'
)


def build_optimizer(
    params: ParamsT,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    offload: bool = False,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (``"adamw"`` or ``"adamw8bit"``) over ``params``.

    ``offload=True`` keeps fp32 master weights and the AdamW state in CPU memory
    (:class:`OffloadAdamW`); it is only available with ``"adamw"``.
    """
    groups = _as_groups(params)
    kw = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
    if name == "adamw":
        return OffloadAdamW(groups, **kw) if offload else torch.optim.AdamW(groups, **kw)
    if name == "adamw8bit":
        if offload:
            raise DistillError(
                "8-bit AdamW cannot be combined with optimizer offload; set "
                'train.optimizer_offload = false, or use train.optimizer = "adamw" with offload'
            )
        tensors = [p for g in groups for p in g["params"]]
        if importlib.util.find_spec("bitsandbytes") is None:
            raise DistillError(f"bitsandbytes is not installed. {_NEEDS_BNB}")
        off_gpu = sorted({str(p.device) for p in tensors if p.device.type != "cuda"})
        if off_gpu:
            raise DistillError(f"the model is on {', '.join(off_gpu)}, not CUDA. {_NEEDS_BNB}")
        import bitsandbytes as bnb  # optional dependency, CUDA only

        return bnb.optim.AdamW8bit(groups, **kw)
    raise DistillError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _as_groups(params: ParamsT) -> list[dict[str, Any]]:
    """Normalise tensors or param-group dicts into a list of groups with list ``params``."""
    items = list(params)
    if not items:
        raise DistillError("the optimizer got no parameters")
    if all(isinstance(g, dict) for g in items):
        return [{**g, "params": list(g["params"])} for g in items]
    if any(isinstance(g, dict) for g in items):
        raise DistillError("pass either parameters or parameter groups, not a mix")
    return [{"params": items}]


class OffloadAdamW(torch.optim.AdamW):
    """AdamW whose fp32 master weights, gradients and moments live in CPU memory.

    ``step()`` copies the device gradients into (pinned, when on CUDA) CPU buffers, runs
    ``torch.optim.AdamW`` on the CPU masters, and copies the updated weights back to the
    device parameters. ``param_groups`` and ``state`` refer to the masters, so ``LambdaLR``,
    ``state_dict`` and ``load_state_dict`` behave as for plain AdamW (and accept its state).

    A device parameter changed outside the optimizer in place (e.g. ``model.load_state_dict``
    when resuming; detected through the tensor version counter) is re-read into its master
    before the next update, so the order of model and optimizer loading does not matter.
    """

    def __init__(self, params: ParamsT, **kwargs: Any) -> None:
        groups = _as_groups(params)
        self._device_params: list[torch.Tensor] = [p for g in groups for p in g["params"]]
        self._pin = torch.cuda.is_available() and any(
            p.device.type == "cuda" for p in self._device_params
        )
        self._masters = [self._cpu_fp32(p) for p in self._device_params]
        self._grads: list[torch.Tensor | None] = [None] * len(self._masters)
        self._versions = [p._version for p in self._device_params]
        it = iter(self._masters)
        master_groups = [{**g, "params": [next(it) for _ in g["params"]]} for g in groups]
        super().__init__(master_groups, **kwargs)

    def _cpu_fp32(self, p: torch.Tensor) -> torch.Tensor:
        out = torch.empty(p.shape, dtype=torch.float32, pin_memory=self._pin)
        return out.copy_(p.detach())

    def _sync_masters(self, force: bool = False) -> None:
        """Re-read device params that were modified outside this optimizer."""
        for i, p in enumerate(self._device_params):
            if force or p._version != self._versions[i]:
                self._masters[i].copy_(p.detach())
                self._versions[i] = p._version

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_masters()
        for i, (p, m) in enumerate(zip(self._device_params, self._masters, strict=True)):
            if p.grad is None:
                m.grad = None
                continue
            if p.grad.is_sparse:
                raise DistillError("optimizer offload does not support sparse gradients")
            buf = self._grads[i]
            if buf is None:
                buf = self._grads[i] = torch.empty_like(m, pin_memory=self._pin)
            buf.copy_(p.grad, non_blocking=self._pin)
            m.grad = buf
        if self._pin:
            torch.cuda.synchronize()  # the non-blocking grad copies must land before the update
        super().step()
        for i, (p, m) in enumerate(zip(self._device_params, self._masters, strict=True)):
            if m.grad is not None:
                p.copy_(m, non_blocking=self._pin)
            self._versions[i] = p._version
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the device gradients (what backward accumulates into) and the masters'."""
        super().zero_grad(set_to_none=True)  # masters' .grad are views of reused buffers
        for p in self._device_params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._sync_masters(force=True)
