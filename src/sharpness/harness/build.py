"""From a config to the objects of a run: device, optimizer (SAM, a variant, or the base alone), learning-rate
schedule."""

from __future__ import annotations

import bisect
import math
import sys
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from sharpness.harness.config import TrainConfig
from sharpness.harness.methods import method_options

__all__ = ["resolve_device", "build_optimizer", "build_schedule", "method_label"]

_BASES: dict[str, type[Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def method_label(config: TrainConfig) -> str:
    """How reports name the run's method: ``label`` if set, else ``sam``, a variant's name, or the base optimizer
    alone (``sgd``, ``adam``, ...)."""
    if config.label:
        return config.label
    return config.optimizer if config.method == "sgd" else config.method


def build_optimizer(
    config: TrainConfig,
    model: nn.Module,
    total_steps: int = 1,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> Optimizer:
    """The base optimizer of the config, wrapped in SAM or the variant that ``method`` names.

    ``total_steps`` is the run's length (AESAM's threshold schedule), ``grad_scaler`` the fp16 loop's scaler.
    A finetuning config (:attr:`TrainConfig.finetunes`) gets two groups, the classifier at ``lr`` first (so the
    schedule's first base rate stays ``lr``) and the rest at ``lr * backbone_lr_scale``, frozen parameters in
    neither (:func:`sharpness.harness.finetune.param_groups`), so weight decay and momentum leave them unchanged.
    """
    base = _BASES[config.optimizer]
    kwargs: dict = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        kwargs.update(momentum=config.momentum, nesterov=config.nesterov)
    params: Any = model.parameters()
    if config.finetunes:
        from sharpness.harness.finetune import param_groups

        params = param_groups(model, config.lr, config.backbone_lr_scale, head=config.head)
    first = next(model.parameters())
    # FSDP2's DTensor parameters have no fused step (their module is loaded if anything was sharded).
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if first.device.type == "cuda" and not (dtensor is not None and isinstance(first, dtensor)):
        kwargs["fused"] = True  # one kernel for the update, and inf/NaN skips stay on the device
    else:
        kwargs["foreach"] = True
    if config.method == "sgd":
        return base(params, **kwargs)
    cls, options = method_options(config, total_steps)
    return cls(
        params,
        base,
        rho=config.rho,
        p=config.p,
        adaptive=config.adaptive,
        eta=config.eta,
        model=model,
        max_grad_norm=config.grad_clip,
        grad_scaler=grad_scaler,
        perturbation=config.perturbation,
        **options,
        **kwargs,
    )


def build_schedule(config: TrainConfig, optimizer: Optimizer, steps_per_epoch: int) -> LambdaLR:
    """A per-step schedule: linear warm-up, then cosine decay to 0, step decay, or constant.

    Step decay multiplies by ``gamma`` at each milestone: a milestone in (0, 1) is that fraction of all steps,
    one >= 1 that epoch (rounded to a step). The run lasts ``train_steps`` where set, else ``epochs`` epochs.
    """
    total = max(1, config.epochs * steps_per_epoch if config.train_steps is None else config.train_steps)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    boundaries = sorted(int(round(m * total)) if m < 1 else int(round(m * steps_per_epoch)) for m in config.milestones)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if config.schedule == "step":
            return config.gamma ** bisect.bisect_right(boundaries, step)
        return 1.0

    return LambdaLR(optimizer, factor)
