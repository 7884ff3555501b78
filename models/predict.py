"""How a network sees an image, and how its logits become probabilities.

Images are stored once as uint8 squares of side resize_size(input_size) (getData's cache, or one
photo in serve.py); a view is a crop of input_size from it (the centre one for plain evaluation),
scaled to [0, 1] and normalised. Test-time augmentation averages the probabilities of several
views; temperature scaling (Guo et al. 2017) divides the logits by one scalar fitted on Valid.
"""
import contextlib

import torch
import torch.nn.functional as F

from models.runtime import constant

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: torchvision's pretrained weights expect them
STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875  # the usual resize-256 / crop-224

# Test-time views: (crop position, flips). The first is the plain prediction.
TTA_VIEWS = (("center", ""), ("center", "h"), ("center", "v"), ("center", "hv"),
             ("top-left", ""), ("top-right", ""), ("bottom-left", ""), ("bottom-right", ""))
PLAIN_VIEW = TTA_VIEWS[:1]


def resize_size(input_size: int) -> int:
    """Side of the square images are stored at, before the crop to `input_size`."""
    return int(round(input_size / CROP_RATIO))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] (B, 3, H, W) -> normalised with the ImageNet mean/std."""
    mean, std = (constant(v, x.device, x.dtype, (1, 3, 1, 1)) for v in (MEAN, STD))
    return (x - mean).div_(std)


def crop(x: torch.Tensor, size: int, where: str = "center") -> torch.Tensor:
    """A size x size crop of (..., H, W): the centre or one of the four corners."""
    h, w = x.shape[-2:]
    top = {"top": 0, "bottom": h - size}.get(where.split("-")[0], (h - size) // 2)
    left = {"left": 0, "right": w - size}.get(where.split("-")[-1], (w - size) // 2)
    return x[..., top:top + size, left:left + size]


def view(x_uint8: torch.Tensor, size: int, where: str = "center", flips: str = "") -> torch.Tensor:
    """Cached uint8 images (B, 3, S', S') -> one normalised view (B, 3, size, size)."""
    x = crop(x_uint8, size, where)
    dims = [d for f, d in (("v", -2), ("h", -1)) if f in flips]
    return normalize((x.flip(dims) if dims else x).float().div_(255))


def to_input(x_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation input: the centre crop, scaled and normalised."""
    return view(x_uint8, size)


@torch.no_grad()
def device_logits(model, images: torch.Tensor, rt, batch_size: int = 64, views=PLAIN_VIEW) -> torch.Tensor:
    """Logits (V, N, C) of an eval-mode model for V views of cached uint8 images; float32, left on the
    runtime's device."""
    return torch.stack([torch.cat([rt.forward(model, view(images[i:i + batch_size].to(rt.device), model.input_size,
                                                          where, flips))
                                   for i in range(0, len(images), batch_size)]) for where, flips in views])


def predict_logits(model, images: torch.Tensor, rt, batch_size: int = 64, views=PLAIN_VIEW) -> torch.Tensor:
    """device_logits on the CPU: one copy back to the host at the end, not one wait per batch."""
    return device_logits(model, images, rt, batch_size, views).cpu()


@contextlib.contextmanager
def capture_features(model):
    """Collects, per forward pass inside the block, what the out-of-distribution scores read (detached,
    float32, on the device): {"head": the pooled features the classifier head receives, and for each
    of `model.ood_layers` its output averaged over positions}."""
    seen, stages = [], {}

    def stage(name):
        return lambda module, inputs, output: stages.update({name: output.detach().mean((-2, -1), dtype=torch.float32)})

    def head(module, inputs, output):
        seen.append(dict(stages, head=inputs[0].detach().float()))
        stages.clear()
    handles = [model.get_submodule(name).register_forward_hook(stage(name)) for name in model.ood_layers]
    handles.append(model.head.register_forward_hook(head))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def logits_and_features(model, images: torch.Tensor, rt, batch_size: int = 64, views=PLAIN_VIEW):
    """(logits (V, N, C), capture_features' dict of the first view's features, each (N, F)), on the
    CPU, from one pass."""
    with capture_features(model) as seen:
        logits = device_logits(model, images, rt, batch_size, views)
    return logits.cpu(), {k: torch.cat([s[k] for s in seen])[:len(images)].cpu() for k in seen[0]}


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(V, N, C) logits -> (N, C) probabilities: softmax(logits / T) averaged over the views."""
    return (logits / temperature).softmax(-1).mean(0)


def predict(model, images, rt, batch_size: int = 64, tta: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities (N, C) of an eval-mode model on cached uint8 images."""
    return probabilities(predict_logits(model, images, rt, batch_size, TTA_VIEWS if tta else PLAIN_VIEW), temperature)


@torch.no_grad()
def embed(model, images, rt, batch_size: int = 64) -> torch.Tensor:
    """Pooled backbone features (N, F) of the plain view, on the CPU: for k-NN monitors and SVMs."""
    return torch.cat([rt.forward(model.features, to_input(images[i:i + batch_size].to(rt.device), model.input_size))
                      for i in range(0, len(images), batch_size)]).cpu()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T > 0 that minimises the negative log-likelihood of probabilities(logits, T) on held-out
    data (Guo et al. 2017: one scalar, fitted with L-BFGS). The argmax never changes."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        loss = F.nll_loss(probabilities(logits, log_t.exp()).clamp_min(1e-12).log(), targets)
        loss.backward()
        return loss
    opt.step(nll)
    return float(log_t.detach().exp())
