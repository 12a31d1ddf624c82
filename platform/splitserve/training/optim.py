"""Optimizers and learning-rate schedules from the resolved options."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace

import torch
from compressai.entropy_models import EntropyBottleneck
from torch import nn

from ..errors import SplitserveError
from ..models import FeatureCodec
from .engine import ScheduledLR


def split_codec_params(codec: nn.Module, prefix: str = "") -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """CompressAI convention: the prior's ``quantiles`` go to the aux optimizer, the rest to the main one."""
    main, aux = [], []
    for name, p in codec.named_parameters(prefix=prefix):
        if not p.requires_grad:
            continue
        (aux if name.endswith("quantiles") else main).append(p)
    return main, aux


def entropy_model_params(codec: nn.Module) -> list[nn.Parameter]:
    """The codec's trainable entropy-model parameters besides the quantiles: the density of every
    ``EntropyBottleneck`` in it (a feature codec's priors, a CompressAI image codec's bottleneck) and
    a variable-rate feature codec's gains and inverse gains (the server's undo of the gains, which
    must keep pace with them)."""
    if isinstance(codec, FeatureCodec):
        params = codec.prior_parameters()
    else:
        params = [p for m in codec.modules() if isinstance(m, EntropyBottleneck) for p in m.parameters()]
    quantiles = {id(m.quantiles) for m in codec.modules() if isinstance(m, EntropyBottleneck)}
    return [p for p in params if p.requires_grad and id(p) not in quantiles]


def with_prior_optimizer(params: dict[str, list], codec: nn.Module, prior_lr: float | None) -> dict[str, list]:
    """``params`` with the codec's entropy model (:func:`entropy_model_params`) moved out of ``main``
    into a ``prior`` optimizer when ``--prior-lr`` is set (else unchanged).

    Why: a density learns from the rate term alone, whose gradient is a few bits per latent value
    spread over the image's pixels; under the task's SGD that moves it slowly (a single-rate run
    here charged twice the latent's entropy after 9 epochs, and a six-rate run's gains moved 0.04
    in 3 epochs), and Adam's steps do not depend on that scale. Only parameters ``main`` holds move.
    """
    if prior_lr is None:
        return params
    if not prior_lr > 0:
        raise SplitserveError(f"--prior-lr must be > 0, got {prior_lr}")
    held = {id(p) for g in params["main"] for p in (g["params"] if isinstance(g, dict) else [g])}
    prior = [p for p in entropy_model_params(codec) if id(p) in held]
    if not prior:
        raise SplitserveError("--prior-lr: this codec has no trainable entropy model to give its own optimizer")
    ids = {id(p) for p in prior}
    main = []
    for group in params["main"]:
        if isinstance(group, dict):
            group = {**group, "params": [p for p in group["params"] if id(p) not in ids]}
        elif id(group) in ids:
            continue
        main.append(group)
    return {**params, "main": main, "prior": prior}


def build_optimizers(params: Mapping[str, Sequence[nn.Parameter]], cfg: SimpleNamespace, num_items: int,
                     world_size: int) -> tuple[dict[str, torch.optim.Optimizer], list[ScheduledLR]]:
    """The run's optimizers: ``main`` from the options (``--optimizer``, ``--lr``, ``--scheduler``);
    for a prior's quantiles, ``aux`` (Adam at ``--aux-lr``, never scheduled, as in CompressAI); and,
    for the entropy model when it has its own (:func:`with_prior_optimizer`), ``prior`` (Adam at
    ``--prior-lr``, on the main schedule)."""
    main = build_optimizer(params["main"], cfg)
    optimizers = {"main": main}
    if "aux" in params:
        optimizers["aux"] = torch.optim.Adam(params["aux"], lr=cfg.aux_lr)
    steps = steps_per_epoch(num_items, cfg.batch_size, world_size)
    schedulers = build_scheduler(main, cfg, steps)
    if "prior" in params:
        optimizers["prior"] = torch.optim.Adam(params["prior"], lr=cfg.prior_lr)
        schedulers += build_scheduler(optimizers["prior"], cfg, steps)
    return optimizers, schedulers


def decayed_weights(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``module``'s trainable conv/linear weights (what weight decay is for) and the rest (biases,
    norm scales), as the references split them."""
    weights, rest = [], []
    for p in module.parameters():
        if p.requires_grad:
            (weights if p.ndim > 1 else rest).append(p)
    return weights, rest


def build_optimizer(params: Iterable[nn.Parameter | dict], cfg: SimpleNamespace, lr: float | None = None) -> torch.optim.Optimizer:
    """``params``: parameters, or torch parameter groups (dicts) where a group needs its own
    ``weight_decay``; frozen parameters are left out."""
    groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    params = [g for g in groups if g["params"]]
    if not params:
        raise SplitserveError("nothing to optimise: every parameter is frozen")
    lr = cfg.lr if lr is None else lr
    if lr <= 0:
        raise SplitserveError(f"--lr must be > 0, got {lr}")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise SplitserveError(f"unknown optimizer {cfg.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SimpleNamespace, steps_per_epoch: int) -> list[ScheduledLR]:
    """``multistep``/``step`` advance once per epoch; ``cosine`` and ``poly`` once per step over the whole run."""
    kind = cfg.scheduler
    if kind == "none" or cfg.epochs <= 0:
        return []
    if kind == "multistep":
        return [ScheduledLR(torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), gamma=cfg.gamma))]
    if kind == "step":
        if cfg.step_size < 1:
            raise SplitserveError(f"--step-size must be >= 1, got {cfg.step_size}")
        return [ScheduledLR(torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, gamma=cfg.gamma))]
    if kind == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch)
        eta_min = optimizer.param_groups[0]["lr"] * cfg.min_lr_ratio
        return [ScheduledLR(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=eta_min), "step")]
    if kind == "poly":  # (1 - step/total)^power, per step: the segmentation references' schedule
        total, power = max(1, cfg.epochs * steps_per_epoch), cfg.poly_power
        return [ScheduledLR(torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (1 - min(step, total) / total) ** power), "step")]
    raise SplitserveError(f"unknown scheduler {kind!r}")


def steps_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    per_rank = math.ceil(num_items / world_size)
    return max(1, per_rank // batch_size if per_rank >= batch_size else 1)
