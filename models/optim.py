"""How networks are optimised: parameter groups, optimizers by name (LARS written out), warm-up +
cosine schedule, and an exponential moving average of the weights."""
import copy
import math

import torch
from torch import nn

from getData import Number
from models.checkpoint import ModelError, unwrap

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "lars")
# --lr's type in train.py and simclr.py. Bounded above: the optimizers cast it to float32, which has no
# 1e39; 1e10 is far past any rate that trains (LARS's trust ratio takes 1e8 to diverge within an epoch),
# and a run that diverges stops with one line.
LEARNING_RATE = Number(float, 0, 1e10, open_low=True)


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
        """One step for all of a group's parameters at once (torch._foreach_*: a few kernel launches per
        group, not several per parameter)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
            weights = [i for i, p in enumerate(params) if p.ndim > 1]
            if weights:
                w_norm = torch.stack(torch._foreach_norm([params[i] for i in weights]))
                g_norm = torch.stack(torch._foreach_norm([grads[i] for i in weights]))
                ratio = group["trust_coefficient"] * w_norm / (g_norm + group["eps"])
                trust = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(w_norm))
                scaled = torch._foreach_mul([grads[i] for i in weights], list(trust.unbind()))
                for i, g in zip(weights, scaled):
                    grads[i] = g
            self._momentum_step(params, grads, group)
        return loss

    def _momentum_step(self, params, grads, group) -> None:
        """buf = momentum * buf + g (the first step: buf = g); p -= lr * buf."""
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        old = [i for i, b in enumerate(bufs) if b is not None]
        if old:
            torch._foreach_mul_([bufs[i] for i in old], group["momentum"])
            torch._foreach_add_([bufs[i] for i in old], [grads[i] for i in old])
        for i, p in enumerate(params):
            if bufs[i] is None:
                bufs[i] = self.state[p]["momentum_buffer"] = torch.clone(grads[i]).detach()
        torch._foreach_add_(params, bufs, alpha=-group["lr"])


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
    """An optimizer by name over parameter groups that carry their own weight decay. Adam and AdamW
    on a GPU are fused, one kernel per step for all parameters (PyTorch's default there, foreach, is
    a chain of them, and a step of this dataset's small batches is launch-bound; nanoGPT does the same).
    On a CPU they keep PyTorch's per-tensor arithmetic, README's figures' (fused differs in the last bits)."""
    fused = True if groups[0]["params"][0].is_cuda else None
    if name == "sgd":
        return torch.optim.SGD(groups, lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr, fused=fused)
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
        self._source, self._floats, self._ints = None, None, None

    def _pair_up(self, model: nn.Module) -> None:
        """The averaged and the trained tensors, floating and integer, as lists made once: a step then
        updates them with two fused calls instead of a Python loop over two state_dicts."""
        mine, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        floats = [k for k in mine if mine[k].is_floating_point()]
        ints = [k for k in mine if not mine[k].is_floating_point()]
        self._floats = [mine[k] for k in floats], [theirs[k] for k in floats]
        self._ints = [mine[k] for k in ints], [theirs[k] for k in ints]
        self._source = model

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        model = unwrap(model)
        if model is not self._source:
            self._pair_up(model)
        if self._floats[0]:
            torch._foreach_lerp_(self._floats[0], self._floats[1], 1 - d)
        if self._ints[0]:
            torch._foreach_copy_(self._ints[0], self._ints[1])

    def state_dict(self) -> dict:
        return dict(module=self.module.state_dict(), updates=self.updates)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
