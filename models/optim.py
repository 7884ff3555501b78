"""How networks are optimised: parameter groups, optimizers by name (LARS written out), warm-up +
cosine schedule, and an exponential moving average of the weights."""
import copy
import math

import torch
from torch import nn

from models.checkpoint import ModelError, unwrap

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "lars")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as SimCLR pre-trains with.

    Each weight's step is scaled by trust * ||w|| / ||g + wd * w||. Biases and normalisation
    parameters (1-d tensors) keep plain momentum SGD, without the trust ratio, as in SimCLR; their
    weight decay is their group's (none, with param_groups' split).
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                if p.ndim > 1:
                    w_norm, g_norm = p.norm(), g.norm()
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                                        torch.ones_like(w_norm))
                    g = g.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Weight decay on weights only: biases and normalisation parameters (the 1-d tensors) get none
    ("no bias decay", He et al. 2019, after Jia et al. 2018); decaying BatchNorm's scale only fights
    its scale invariance. `decay_all` puts everything in one decayed group instead."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_all:
        return [dict(params=params, weight_decay=weight_decay)]
    groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay),
              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def make_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """An optimizer by name over parameter groups that carry their own weight decay."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr)
    if name == "lars":
        return LARS(groups, lr)
    raise ModelError(f"--optimizer {name}: use {', '.join(OPTIMIZERS)}")


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier per step: linear warm-up, then cosine decay to 0 (Loshchilov & Hutter 2017)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return factor


class EMA:
    """Exponential moving average of a model's weights (Polyak & Juditsky 1992), evaluated in place of
    the raw weights. The decay ramps up as (1 + n) / (10 + n) over the first updates (as in
    TensorFlow's ExponentialMovingAverage), so early averages do not remember the random init.
    BatchNorm statistics are averaged like weights; integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, new in zip(self.module.state_dict().values(), unwrap(model).state_dict().values()):
            if avg.is_floating_point():
                avg.lerp_(new, 1 - d)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict:
        return dict(module=self.module.state_dict(), updates=self.updates)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
