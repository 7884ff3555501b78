"""How networks are optimised: optimizers by name (LARS written out), warm-up + cosine schedule."""
import math

import torch

from models.checkpoint import ModelError

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "lars")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as SimCLR pre-trains with.

    Each weight's step is scaled by trust * ||w|| / ||g + wd * w||. Biases and normalisation
    parameters (1-d tensors) get neither weight decay nor the trust ratio, as in SimCLR.
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
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
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


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr, weight_decay=weight_decay)
    raise ModelError(f"--optimizer {name}: use {', '.join(OPTIMIZERS)}")


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier per step: linear warm-up, then cosine decay to 0 (Loshchilov & Hutter 2017)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return factor
