"""Every random transform in the project, and an offline writer of augmented copies.

    python augment.py --data-root PATH --fold 1 --factor 5 --out data/aug/fold1   # N copies per Train image
    python augment.py --data-root PATH --fold 1 --balance --out data/aug/fold1-bal  # top classes up
    python augment.py --benchmark --data-root PATH                                  # images/s table

Two implementations of the same random augmentations, drawing from one table of parameters:
- per image, with torchvision.transforms.v2 (`train_transform`, `simclr_transform`), for DataLoaders;
- per batch, on uint8 tensors already on the device (`BatchAugment`), so that with the decoded
  dataset on the GPU an epoch needs no CPU work per image. train.py and simclr.py use this one.
Colour changes stay mild and never rotate hue: lesion colour is diagnostic. The deterministic
evaluation view (centre crop, normalisation) belongs to the networks: models/predict.py.
"""
import functools
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from getData import (AUG_TAG, FOLDS, SEED, DataError, MSLDDataset, Number, Parser, atomic_path, check_folder,
                   check_space, decode_all, index_split, list_classes, load_image, outside_datasets, quiet_pillow,
                   refuse_unused, run_main, spawned_deaf_to_ctrl_c, to_json, usable_folds_root)
from models import MEAN, STD, constant, derived_seed, normalize, resize_size, seed_worker, send, to_input

DEFAULTS = dict(data_root="data", fold=1, factor=5, ops="all", seed=0, workers=0, size=224, batch_size=64,
                augment="basic")
MAX_FACTOR = 100  # copies per image: 54k files from fold 1's 537 Train photos; more only repeats the ops' draws

# TrivialAugment (Müller & Hutter 2021): each image gets one operation, at a strength drawn uniformly
# from [0, max] (signed ops: either direction). Geometry as its "wide" space (rotation narrower, shear
# as a factor); colour capped at +-0.5, and no hue, solarize or equalize, which remap colours per
# channel. Values: the largest strength of each operation.
TRIVIAL_OPS = dict(identity=0.0, rotate=90.0, shear_x=0.5, shear_y=0.5, translate_x=0.15, translate_y=0.15,
                   brightness=0.5, contrast=0.5, saturation=0.5, sharpness=0.9, posterize=4, autocontrast=1.0)
UNSIGNED = ("identity", "posterize", "autocontrast")

# Supervised training: crops keep >= 70% of the lesion area; lesions have no canonical orientation.
TRAIN_OPS = dict(crop=dict(scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)), hflip=dict(p=0.5), vflip=dict(p=0.5),
                 color=dict(brightness=0.2, contrast=0.2, saturation=0.2, p=1.0))
# The wider set: the same crop and flips, then one TrivialAugment operation instead of colour jitter.
TRIVIAL_TRAIN_OPS = dict(crop=TRAIN_OPS["crop"], hflip=dict(p=0.5), vflip=dict(p=0.5), trivial=TRIVIAL_OPS)
# SimCLR (Chen et al. 2020, appendix A): crop + flip + colour jitter (p=0.8) + greyscale (p=0.2) + blur
# (p=0.5, sigma 0.1-2.0). Milder than the paper: crop scale from 0.2 (paper 0.08), jitter 0.4 (paper 0.8),
# no hue rotation. The paper's 20% greyscale views stay: without them two crops are matched by skin tone
# alone, and on the synthetic set the encoder then got worse than a random one under a linear probe.
SIMCLR_OPS = dict(crop=dict(scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)), hflip=dict(p=0.5), vflip=dict(p=0.5),
                  color=dict(brightness=0.4, contrast=0.4, saturation=0.4, p=0.8, grey=0.2),
                  blur=dict(sigma=(0.1, 2.0), p=0.5))
# The offline operations of Mpox-AISM, each applied with probability 0.5.
OFFLINE_OPS = dict(noise=dict(std=(0.0, 0.05), p=0.5), crop=dict(scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), p=0.5),
                   affine=dict(degrees=20.0, shear=10.0, translate=0.1, scale=(0.9, 1.1), p=0.5),
                   cutout=dict(size=(0.1, 0.3), p=0.5), hflip=dict(p=0.5), vflip=dict(p=0.5),
                   gamma=dict(gamma=(0.7, 1.5), p=0.5), blur=dict(sigma=(0.3, 1.5), p=0.5))
TRAIN_AUGMENTS = dict(basic=TRAIN_OPS, trivial=TRIVIAL_TRAIN_OPS, none={})


# ----------------------------------------------------------------------------- per-image (torchvision)
# torchvision is imported where it is used: importing it adds nearly 2 s to a start (its ops pull in
# torch._dynamo), which the batched path below (what train.py and simclr.py use) never needs.
class TrivialAugment:
    """TRIVIAL_OPS on one float image in [0, 1] (C, H, W), with torchvision's functional ops."""

    def __init__(self, ops: dict = TRIVIAL_OPS):
        self.ops = ops

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        name = list(self.ops)[int(torch.randint(len(self.ops), ()))]
        s = float(torch.rand(())) * self.ops[name]
        if name not in UNSIGNED and torch.rand(()) < 0.5:
            s = -s
        h, w = img.shape[-2:]
        none = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0])
        if name == "rotate":
            return TF.affine(img, **{**none, "angle": s})
        if name in ("shear_x", "shear_y"):
            shear = math.degrees(math.atan(s))
            return TF.affine(img, **{**none, "shear": [shear, 0.0] if name == "shear_x" else [0.0, shear]})
        if name in ("translate_x", "translate_y"):
            shift = [round(s * w), 0] if name == "translate_x" else [0, round(s * h)]
            return TF.affine(img, **{**none, "translate": shift})
        if name in ("brightness", "contrast", "saturation", "sharpness"):
            return getattr(TF, f"adjust_{name}")(img, 1 + s)
        if name == "posterize":
            bits = 8 - round(s)
            return TF.to_dtype(TF.posterize(TF.to_dtype(img, torch.uint8, scale=True), bits), torch.float32, scale=True)
        if name == "autocontrast":
            return TF.autocontrast(img)
        return img


def _v2_pipeline(size: int, ops: dict):
    """PIL or uint8 tensor in, `ops` drawn per image, normalised float tensor out."""
    from torchvision.transforms import v2
    crop = ops["crop"]
    out = [v2.RandomResizedCrop(size, scale=crop["scale"], ratio=crop["ratio"], antialias=True),
           v2.RandomHorizontalFlip(ops["hflip"]["p"]), v2.RandomVerticalFlip(ops["vflip"]["p"]),
           v2.ToDtype(torch.float32, scale=True)]
    if "color" in ops:
        color = ops["color"]
        jitter = v2.ColorJitter(color["brightness"], color["contrast"], color["saturation"])
        out.append(v2.RandomApply([jitter], p=color["p"]))
        if color.get("grey"):
            out.append(v2.RandomGrayscale(color["grey"]))
    if "trivial" in ops:
        out.append(TrivialAugment(ops["trivial"]))
    if "blur" in ops:
        sigma = ops["blur"]["sigma"]
        out.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(sigma[1], size), sigma)], p=ops["blur"]["p"]))
    return v2.Compose([v2.ToImage(), *out, v2.Normalize(MEAN, STD)])


def train_transform(size: int, ops: dict = TRAIN_OPS):
    """Per-image training augmentation (PIL or uint8 tensor in): the DataLoader counterpart of BatchAugment."""
    return _v2_pipeline(size, ops)


class TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, x):
        return self.transform(x), self.transform(x)


def simclr_transform(size: int):
    """Per-image SimCLR: two independent views of each image."""
    return TwoViews(_v2_pipeline(size, SIMCLR_OPS))


# ----------------------------------------------------------------------------- batched ops
# Every random op comes in two halves: draw_* takes a CPU torch.Generator and returns the batch's
# random parameters as CPU tensors (a few numbers per image, so results do not depend on the device),
# and apply_* uses them on the device the images are on. A batch's draws are sent there together
# (models.runtime.send: one copy that never makes the host wait for the GPU); `geometric`, `color`,
# ... below are the two halves in one call, for use on their own.
def _uniform(gen, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _coin(gen, n, p):
    return torch.rand(n, generator=gen) < p


def _where(mask, new, old):
    return torch.where(mask.to(old.device).view(-1, 1, 1, 1), new, old)


def _crop_boxes(gen, n, scale, ratio, tries=10):
    """RandomResizedCrop's sampler, vectorised: first of `tries` candidates that fits, else the whole image."""
    area = _uniform(gen, (n, tries), *scale)
    aspect = torch.exp(_uniform(gen, (n, tries), math.log(ratio[0]), math.log(ratio[1])))
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)  # fractions of the side
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], torch.ones(n))
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], torch.ones(n))
    cx, cy = (1 - w) * _uniform(gen, n, -1, 1), (1 - h) * _uniform(gen, n, -1, 1)  # centre, in [-1, 1] coords
    return w, h, cx, cy


def _random_affine(gen, n, degrees, shear, translate, scale, p) -> dict:
    """RandomAffine's parameters per image (radians, [-1, 1] coordinates), identity where not applied."""
    use = _coin(gen, n, p).float()
    return dict(angle=use * torch.deg2rad(_uniform(gen, n, -degrees, degrees)),
                shear_x=use * torch.tan(torch.deg2rad(_uniform(gen, n, -shear, shear))),
                zoom=1 + use * (_uniform(gen, n, *scale) - 1),
                tx=use * _uniform(gen, n, -2 * translate, 2 * translate),
                ty=use * _uniform(gen, n, -2 * translate, 2 * translate))


def draw_geometry(gen, n, height, width, crop=None, affine=None, hflip=None, vflip=None, moves=None) -> torch.Tensor:
    """Crop-and-resize, rotation/shear/translation/zoom and flips of n images of height x width,
    composed into one affine matrix per image (n, 2, 3) for one grid_sample. `moves`: per-image affine
    parameters drawn elsewhere (TrivialAugment's), added to RandomAffine's."""
    one, zero = torch.ones(n), torch.zeros(n)
    w, h, cx, cy = one, one, zero, zero
    if crop:
        w2, h2, cx2, cy2 = _crop_boxes(gen, n, crop["scale"], crop["ratio"])
        use = _coin(gen, n, crop.get("p", 1.0))
        w, h, cx, cy = (torch.where(use, a, b) for a, b in ((w2, w), (h2, h), (cx2, cx), (cy2, cy)))
    m = dict(angle=zero, shear_x=zero, shear_y=zero, zoom=one, tx=zero, ty=zero)
    for extra in (_random_affine(gen, n, **affine) if affine else {}, moves or {}):
        for k, v in extra.items():
            m[k] = m[k] * v if k == "zoom" else m[k] + v
    fx = torch.where(_coin(gen, n, hflip["p"]), -one, one) if hflip else one
    fy = torch.where(_coin(gen, n, vflip["p"]), -one, one) if vflip else one
    # Output coords u (normalised [-1, 1]) -> input coords: c + D^-1 R Sh D diag(w, h) F u / zoom,
    # with D = diag(aspect, 1) so rotations and shears are rigid in pixels on non-square images.
    aspect = width / height
    cos, sin = torch.cos(m["angle"]), torch.sin(m["angle"])
    rot = torch.stack([torch.stack([cos, -sin / aspect], -1), torch.stack([sin * aspect, cos], -1)], 1)  # D^-1 R D
    shear = torch.stack([torch.stack([one, m["shear_x"] / aspect], -1),
                         torch.stack([m["shear_y"] * aspect, one], -1)], 1)
    lin = rot @ shear * torch.stack([w * fx, h * fy], -1)[:, None, :] / m["zoom"][:, None, None]
    return torch.cat([lin, torch.stack([cx + m["tx"], cy + m["ty"]], -1)[:, :, None]], 2)


def apply_geometry(x, theta, out_hw) -> torch.Tensor:
    return grid_sample(x, affine_grid(theta.to(x), *out_hw))


def geometric(x, gen, out_size=None, crop=None, affine=None, hflip=None, vflip=None, moves=None):
    """draw_geometry and apply_geometry in one call; `out_size`: an int, (h, w), or None (x's own)."""
    n, _, height, width = x.shape
    theta = draw_geometry(gen, n, height, width, crop, affine, hflip, vflip, moves)
    return apply_geometry(x, send(theta, x.device), _out_hw(out_size, height, width))


def _out_hw(out_size, height, width) -> tuple[int, int]:
    return (out_size, out_size) if isinstance(out_size, int) else tuple(out_size or (height, width))


@functools.lru_cache(maxsize=8)
def _base_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Output pixel centres (x, y, 1) in [-1, 1] coordinates (align_corners=False), (1, H*W, 3)."""
    xs = (torch.arange(width, device=device, dtype=dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=device, dtype=dtype) * 2 + 1) / height - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, (B, C, H, W), align_corners=False) as one broadcast matrix product with a
    cached base grid: the same numbers, about 5x faster on a CPU (no expanded base grid per image)."""
    return (_base_grid(height, width, theta.device, theta.dtype) @ theta.transpose(1, 2)).view(-1, height, width, 2)


def grid_sample(x, grid):
    # Reflection instead of black corners: skin continues past the photo's edge.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, with torchvision's rounding
EYE3 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def color_matrix(x, b, c, s, normalized: bool = False):
    """Brightness b, contrast c, saturation s (per image; 1 = unchanged) as one 3x3 colour matrix and
    offset per image: a single pass. torchvision's formulas in that order; it clamps after each step,
    we clamp once at the end (differs only for pixels pushed past white and back). `normalized`: fold
    the ImageNet normalisation into the same pass (the clamp to [0, 1] becomes one in its units)."""
    b, c, s = (v.to(x) for v in (b, c, s))
    w = constant(GREY, x.device, x.dtype)
    mean_grey = (x.mean((2, 3)) @ w) * b  # mean luma after brightness
    sat = s.view(-1, 1, 1) * constant(EYE3, x.device, x.dtype, (3, 3)) + (1 - s).view(-1, 1, 1) * w.view(1, 1, 3)
    matrix = sat * (b * c).view(-1, 1, 1)
    offset = sat.sum(2) * ((1 - c) * mean_grey).view(-1, 1)  # contrast pulls towards the mean luma
    low, high = constant((0.0,) * 3, x.device, x.dtype, (3, 1)), constant((1.0,) * 3, x.device, x.dtype, (3, 1))
    if normalized:
        mean, std = constant(MEAN, x.device, x.dtype, (3, 1)), constant(STD, x.device, x.dtype, (3, 1))
        matrix, offset = matrix / std, (offset - mean.T) / std.T
        low, high = (low - mean) / std, (high - mean) / std
    y = torch.baddbmm(offset[:, :, None], matrix, x.flatten(2))
    return torch.clamp_(y, low, high).view_as(x)


def draw_color(gen, n, brightness, contrast, saturation, p=1.0, grey=0.0) -> dict:
    """ColorJitter without hue (and RandomGrayscale, as saturation 0): per-image factors."""
    use = _coin(gen, n, p)
    b, c, s = (torch.where(use, _uniform(gen, n, 1 - v, 1 + v), torch.ones(n))
               for v in (brightness, contrast, saturation))
    if grey:
        s = torch.where(_coin(gen, n, grey), torch.zeros(n), s)  # saturation 0 is RandomGrayscale
    return dict(b=b, c=c, s=s)


def apply_color(x, d, normalized=False):
    return color_matrix(x, d["b"], d["c"], d["s"], normalized)


def draw_gamma(gen, n, gamma, p) -> dict:
    return dict(g=_uniform(gen, n, *gamma), use=_coin(gen, n, p))


def apply_gamma(x, d):
    return _where(d["use"], x.clamp_min(1e-6) ** d["g"].to(x).view(-1, 1, 1, 1), x)


def _blur_kernel(sigma_max, size):
    return min(2 * math.ceil(3 * sigma_max) + 1, (size // 2) * 2 - 1)


def draw_blur(gen, n, sigma, p) -> dict:
    return dict(sigma=_uniform(gen, n, *sigma), use=_coin(gen, n, p), sigma_max=sigma[1])


def apply_blur(x, d):
    """Gaussian blur with a per-image sigma: one grouped, separable convolution for the batch."""
    n, ch, height, width = x.shape
    k = _blur_kernel(d["sigma_max"], min(height, width))
    s = d["sigma"].to(x)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-0.5 * (t[None] / s[:, None]) ** 2)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (n*ch, k)
    y = x.reshape(1, n * ch, height, width)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern[:, None, None, :], groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern[:, None, :, None], groups=n * ch)
    return _where(d["use"], y.view(n, ch, height, width), x)


def draw_noise(gen, n, std, p) -> dict:
    """Per-image noise strength; the per-pixel draw uses a generator on the images' device, seeded here."""
    return dict(std=_uniform(gen, n, *std), seed=int(torch.randint(2**62, (1,), generator=gen)), use=_coin(gen, n, p))


def apply_noise(x, d):
    dev_gen = torch.Generator(device=x.device).manual_seed(d["seed"])
    s = d["std"].to(x).view(-1, 1, 1, 1)
    y = (x + s * torch.randn(x.shape, generator=dev_gen, device=x.device, dtype=x.dtype)).clamp(0, 1)
    return _where(d["use"], y, x)


def draw_cutout(gen, n, height, width, size, p) -> dict:
    """One grey rectangle per image (DeVries & Taylor 2017), sides a random fraction of the image."""
    sh, sw = (_uniform(gen, n, *size) * side for side in (height, width))
    cy, cx = _uniform(gen, n, 0, height), _uniform(gen, n, 0, width)
    return dict(sh=sh, sw=sw, cy=cy, cx=cx, use=_coin(gen, n, p))


def apply_cutout(x, d):
    _, _, height, width = x.shape
    sh, sw, cy, cx, use = (d[k].to(x.device).view(-1, 1, 1) for k in ("sh", "sw", "cy", "cx", "use"))
    ys = torch.arange(height, device=x.device).view(1, -1, 1) + 0.5
    xs = torch.arange(width, device=x.device).view(1, 1, -1) + 0.5
    box = ((ys - cy).abs() < sh / 2) & ((xs - cx).abs() < sw / 2) & use
    return torch.where(box[:, None], torch.full_like(x, 0.5), x)


def color(x, gen, brightness, contrast, saturation, p=1.0, grey=0.0, normalized=False):
    """draw_color and apply_color in one call."""
    return apply_color(x, send(draw_color(gen, x.shape[0], brightness, contrast, saturation, p, grey), x.device),
                       normalized)


# ----------------------------------------------------------------------------- TrivialAugment, batched
def trivial_draw(gen, n, ops: dict = TRIVIAL_OPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: which operation (index into `ops`) and its signed strength."""
    names = list(ops)
    which = torch.randint(len(names), (n,), generator=gen)
    strength = torch.rand(n, generator=gen) * torch.tensor([float(ops[k]) for k in names])[which]
    signed = torch.tensor([k not in UNSIGNED for k in names])[which]
    sign = torch.where(_coin(gen, n, 0.5) & signed, -1.0, 1.0)
    return which, strength * sign


def trivial_moves(which, s, ops: dict = TRIVIAL_OPS) -> dict:
    """The geometric operations' share, as per-image affine parameters for draw_geometry()."""
    names = list(ops)

    def pick(name):
        return torch.where(which == names.index(name), s, 0.0) if name in names else torch.zeros_like(s)
    return dict(angle=torch.deg2rad(pick("rotate")), shear_x=pick("shear_x"), shear_y=pick("shear_y"),
                tx=2 * pick("translate_x"), ty=2 * pick("translate_y"))


def sharpness(x, factor):
    """torchvision's adjust_sharpness per image: blend with a 3x3 smoothing (border pixels kept)."""
    smooth = x.clone()  # kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (9 x the 3x3 mean + 4 x the centre) / 13
    smooth[..., 1:-1, 1:-1] = (9 * F.avg_pool2d(x, 3, stride=1) + 4 * x[..., 1:-1, 1:-1]) / 13
    f = factor.to(x).view(-1, 1, 1, 1)
    return (smooth + f * (x - smooth)).clamp_(0, 1)


def posterize(x, bits_dropped):
    """Keep 8 - d bits of each 8-bit value, per image (torchvision's posterize, on floats)."""
    step = (2.0 ** bits_dropped.round()).to(x).view(-1, 1, 1, 1)
    return torch.floor(x * 255 / step) * step / 255


def autocontrast(x, _=None):
    """Stretch each channel of each image to [0, 1] (torchvision's autocontrast)."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


TONE_OPS = {"sharpness": lambda x, s: sharpness(x, 1 + s), "posterize": posterize, "autocontrast": autocontrast}


def draw_trivial_pixels(which, s, ops: dict = TRIVIAL_OPS) -> dict:
    """The colour and tone operations' share: colour factors for the whole batch (when any image drew a
    colour op), and for each tone op the indices of the images that drew it, with their strengths."""
    names = list(ops)
    chosen = {k: which == names.index(k) for k in names}
    out = {}
    if any(k in chosen and chosen[k].any() for k in ("brightness", "contrast", "saturation")):
        out["color"] = {f: 1 + torch.where(chosen[k], s, 0.0) if k in chosen else torch.ones_like(s)
                        for f, k in (("b", "brightness"), ("c", "contrast"), ("s", "saturation"))}
    for name in TONE_OPS:
        if name in chosen and chosen[name].any():
            idx = chosen[name].nonzero()[:, 0]
            out[name] = dict(idx=idx, s=s[idx])
    return out


def apply_trivial_pixels(x, d):
    """On the already resampled batch: one colour matrix for the batch, then each tone op on just the
    images that drew it (index sets known on the host: no device-to-host round trip)."""
    x = apply_color(x, d["color"]) if "color" in d else x.clone()  # our own tensor: tone ops write in place
    for name, op in TONE_OPS.items():
        if name in d:
            idx = d[name]["idx"].to(x.device)
            x[idx] = op(x[idx], d[name]["s"])
    return x


DRAW_PIXEL = {"color": lambda gen, shape, **k: draw_color(gen, shape[0], **k),
              "gamma": lambda gen, shape, **k: draw_gamma(gen, shape[0], **k),
              "blur": lambda gen, shape, **k: draw_blur(gen, shape[0], **k),
              "noise": lambda gen, shape, **k: draw_noise(gen, shape[0], **k),
              "cutout": lambda gen, shape, **k: draw_cutout(gen, shape[0], *shape[2:], **k)}
APPLY_PIXEL = {"color": apply_color, "gamma": apply_gamma, "blur": apply_blur, "noise": apply_noise,
               "cutout": apply_cutout}
PIXEL_ORDER = ("color", "gamma", "blur", "noise", "cutout")
GEOMETRIC_OPS = ("crop", "affine", "hflip", "vflip")
OP_NAMES = tuple(OFFLINE_OPS)


def draw_batch(gen, shape, ops: dict, out_size=None) -> dict:
    """Every random parameter `ops` needs for a batch of `shape` (B, C, H, W), as CPU tensors
    ({'theta': ..., 'trivial': {...}, 'color': {...}, ...}), drawn in a fixed order: geometry (with
    TrivialAugment's pick first), then the pixel ops in PIXEL_ORDER."""
    n, _, height, width = shape
    drawn, which = {}, None
    if "trivial" in ops:
        which, s = trivial_draw(gen, n, ops["trivial"])
    geo = {k: ops[k] for k in GEOMETRIC_OPS if k in ops}
    if geo or out_size or which is not None:
        moves = None if which is None else trivial_moves(which, s, ops["trivial"])
        drawn["theta"] = draw_geometry(gen, n, height, width, moves=moves, **geo)
        shape = (n, shape[1], *_out_hw(out_size, height, width))  # what the pixel ops will see
    if which is not None:
        drawn["trivial"] = draw_trivial_pixels(which, s, ops["trivial"])
    for name in PIXEL_ORDER:
        if name in ops:
            drawn[name] = DRAW_PIXEL[name](gen, shape, **ops[name])
    return drawn


def apply_batch(x: torch.Tensor, drawn: dict, ops: dict, out_size=None, normalized: bool = False) -> torch.Tensor:
    """`ops` on a float [0, 1] batch with the parameters of draw_batch (on x's device): geometry first,
    then pixel ops. `normalized`: return it normalised, in the colour pass when colour is the last op."""
    if "theta" in drawn:
        x = apply_geometry(x, drawn["theta"], _out_hw(out_size, *x.shape[-2:]))
    if "trivial" in drawn:
        x = apply_trivial_pixels(x, drawn["trivial"])
    pixel = [name for name in PIXEL_ORDER if name in ops]
    for name in pixel:
        if normalized and name == "color" and name == pixel[-1]:
            x = apply_color(x, drawn[name], normalized=True)
        else:
            x = APPLY_PIXEL[name](x, drawn[name])
    if normalized and not (pixel and pixel[-1] == "color"):
        x = normalize(x)
    return x


def augment_batch(x: torch.Tensor, gen: torch.Generator, ops: dict, out_size=None,
                  normalized: bool = False) -> torch.Tensor:
    """Apply `ops` (name -> parameters) to a float [0, 1] batch: draw_batch, one send, apply_batch."""
    return apply_batch(x, send(draw_batch(gen, x.shape, ops, out_size), x.device), ops, out_size, normalized)


class BatchAugment:
    """uint8 batch (B, 3, S', S') on any device -> augmented, normalised float batch (B, 3, size, size).
    With no ops, the evaluation view itself (the centre crop). `draw` and `apply` split a call in two,
    so that a training step can send its draws with everything else it needs in one copy."""

    def __init__(self, size: int, ops: dict = TRAIN_OPS):
        self.size, self.ops = size, ops

    def draw(self, gen: torch.Generator, shape) -> dict:
        return draw_batch(gen, shape, self.ops, self.size) if self.ops else {}

    def apply(self, x_uint8: torch.Tensor, drawn: dict) -> torch.Tensor:
        if not self.ops:
            return to_input(x_uint8, self.size)
        return apply_batch(x_uint8.float().div_(255), drawn, self.ops, self.size, normalized=True)

    def __call__(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x_uint8, send(self.draw(gen, x_uint8.shape), x_uint8.device))


# ----------------------------------------------------------------------------- MixUp / CutMix
def draw_mix(gen: torch.Generator, n: int, height: int, width: int, mixup: float = 0.0, cutmix: float = 0.0) -> dict:
    """MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with a shuffled copy of itself,
    one of the two per batch when both are on (as timm does); lambda ~ Beta(alpha, alpha). Returns
    {} when both are off, else the partner of each image ('perm', a tensor) and host values: the
    'kind', lambda ('lam') and CutMix's 'box' (clipped at the border; lambda follows the clipped box)."""
    kinds = [(k, a) for k, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0]
    if not kinds:
        return {}
    kind, alpha = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
    lam = float(np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen))).beta(alpha, alpha))
    out = dict(perm=torch.randperm(n, generator=gen), kind=kind, lam=lam)
    if kind == "cutmix":  # a box of area (1 - lam) from the partner
        bh, bw = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy, cx = (int(torch.randint(side, (1,), generator=gen)) for side in (height, width))
        top, bottom = max(cy - bh // 2, 0), min(cy + bh // 2, height)
        left, right = max(cx - bw // 2, 0), min(cx + bw // 2, width)
        out.update(box=(top, bottom, left, right), lam=1 - (bottom - top) * (right - left) / (height * width))
    return out


def apply_mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, drawn: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed images and soft targets (B, num_classes), each row summing to one; with no draws
    (both off), the batch and its class indices unchanged (the loss is then exactly the unmixed one)."""
    if not drawn:
        return x, y
    perm, lam = drawn["perm"].to(x.device), drawn["lam"]
    target = F.one_hot(y, num_classes).float()
    if drawn["kind"] == "mixup":
        x = x.lerp(x[perm], 1 - lam)
    else:
        top, bottom, left, right = drawn["box"]
        x = x.clone()
        x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    return x, target.mul(lam).add_(target[perm.to(target.device)], alpha=1 - lam)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator, mixup: float = 0.0,
              cutmix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """draw_mix and apply_mix in one call."""
    drawn = draw_mix(gen, len(x), *x.shape[-2:], mixup, cutmix)
    return apply_mix(x, y, num_classes, send(drawn, x.device))


# ----------------------------------------------------------------------------- offline writer
def parse_ops(spec: str) -> dict:
    names = OP_NAMES if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in OFFLINE_OPS]
    if unknown or not names:
        raise DataError(f"--ops {spec}: unknown operation {', '.join(unknown) or '(none)'}; "
                        f"choose from {', '.join(OP_NAMES)} or 'all'")
    return {n: OFFLINE_OPS[n] for n in names}


def plan_copies(samples, classes, factor: int | None, balance: bool) -> list[tuple[Path, str, int]]:
    """(source, class, copy number) for every copy to write.

    --factor: N copies of every image. --balance: each class topped up to the largest class count,
    copies spread round-robin over the class's images.
    """
    by_class = {c: [p for p, y in samples if classes[y] == c] for c in classes}
    if not balance:
        return [(p, c, j) for c, paths in by_class.items() for p in paths for j in range(factor)]
    target = max(len(v) for v in by_class.values())
    return [(paths[j % len(paths)], c, j // len(paths)) for c, paths in by_class.items() if paths
            for j in range(target - len(paths))]


def _write_one(task):
    src, dst, seed, ops = task
    x = torch.from_numpy(np.array(load_image(src))).permute(2, 0, 1)[None].float() / 255  # a writable copy
    y = augment_batch(x, torch.Generator().manual_seed(seed), ops)
    Image.fromarray((y[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()).save(dst, quality=95)


def _init_worker():
    torch.set_num_threads(1)  # one process per core instead of threads fighting over cores
    quiet_pillow()


def _in_processes(fn, tasks, workers: int):
    """fn over tasks in `workers` processes (1: in this one), results as they come. Spawned, not
    forked: forking a process that runs threads (a notebook's, a server's) can deadlock the child.
    Ctrl-C is the parent's to handle (leaving the pool stops it): the workers ignore it throughout."""
    if workers == 1:
        yield from map(fn, tasks)
        return
    with spawned_deaf_to_ctrl_c():
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
    with pool:
        yield from pool.imap_unordered(fn, tasks, chunksize=8)


def write_augmented(data_root, fold: int, out, factor: int | None = None, balance: bool = False,
                    ops: str = "all", seed: int = 0, workers: int = 0) -> dict:
    """Write augmented copies of fold `fold`'s Train images to `out/<Class>/NAME__augNN.jpg`, and
    `out/config.json`: what made them (the same arguments write the same files, whatever --workers)."""
    folds_root = usable_folds_root(data_root)
    out = outside_datasets(check_folder(Path(out).resolve()))
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out}: exists and is not empty; choose a new folder")
    if not balance and (factor is None or factor < 1):
        raise DataError(f"--factor {factor}: must be 1 or more (or use --balance)")
    op_params = parse_ops(ops)
    classes = list_classes(folds_root)
    samples = index_split(folds_root, fold, "Train", classes)  # never Valid or Test
    plan = plan_copies(samples, classes, factor, balance)
    check_space(f"--out {out}", sum(src.stat().st_size for src, _, _ in plan), out,  # copies weigh about their sources
                f"writing {len(plan)} augmented copies", "--out")
    width = max(2, len(str(max((j for *_, j in plan), default=0))))
    with atomic_path(out, folder=True) as tmp:
        for c in classes:
            (tmp / c).mkdir()
        tasks = [(src, tmp / c / f"{src.stem}{AUG_TAG}{j:0{width}d}.jpg",
                  derived_seed(seed, fold, i, j), op_params) for i, (src, c, j) in enumerate(plan)]
        for _ in tqdm(_in_processes(_write_one, tasks, workers or os.cpu_count() or 1), total=len(tasks),
                      desc="augment", disable=None):
            pass
        counts = {c: sum(1 for _, cc, _ in plan if cc == c) for c in classes}
        (tmp / "config.json").write_text(to_json(dict(data_root=str(folds_root), fold=fold, factor=factor,
                                                         balance=balance, ops=ops, seed=seed, counts=counts), indent=2))
    print(f"wrote {len(plan)} augmented Train images of fold {fold} to {out}: "
          + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return counts


# ----------------------------------------------------------------------------- benchmark
def _rate(fn, n_images, repeats=3):
    fn()  # warm-up (and cudnn/allocator set-up)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_images / best


def _loader(ds, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """A shuffling DataLoader whose persistent workers start here, spawned and deaf to Ctrl-C as the
    writer's are (_in_processes): not forked from a process that runs torch's threads, and no
    traceback of theirs when Ctrl-C comes while they import torch."""
    loader = torch.utils.data.DataLoader(ds, batch_size, shuffle=True, num_workers=workers, worker_init_fn=seed_worker,
                                         persistent_workers=True, multiprocessing_context="spawn")
    with spawned_deaf_to_ctrl_c():
        iter(loader)  # starts the workers; each later pass reuses them
    return loader


def benchmark(data_root, fold: int, size: int, batch_size: int, workers: int,
              augment: str = "basic") -> list[tuple[str, float]]:
    """images/s of one training epoch's input pipeline, three ways, at `size` x `size`, for one of
    train.py's --augment op sets."""
    folds_root = usable_folds_root(data_root)
    ops = TRAIN_AUGMENTS[augment]
    ds = MSLDDataset(folds_root, fold, "Train", transform=train_transform(size, ops))
    loader = _loader(ds, batch_size, workers or os.cpu_count() or 1)
    rows = [("DataLoader + PIL decode + torchvision v2", _rate(lambda: [b for b in loader], len(ds)))]
    cache = decode_all(ds.paths, resize_size(size))
    aug, gen = BatchAugment(size, ops), torch.Generator().manual_seed(0)

    def epoch(images):
        for i in range(0, len(images), batch_size):
            aug(images[i:i + batch_size], gen)
        if images.is_cuda:
            torch.cuda.synchronize()

    rows.append(("uint8 cache on CPU + BatchAugment", _rate(lambda: epoch(cache), len(ds))))
    if torch.cuda.is_available():
        gpu = cache.to(torch.device("cuda"))
        rows.append(("uint8 cache on GPU + BatchAugment", _rate(lambda: epoch(gpu), len(ds))))
    else:
        rows.append(("uint8 cache on GPU + BatchAugment", float("nan")))
    return rows


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    d, at_least_1 = DEFAULTS, Number(int, 1)
    p = Parser(__doc__, __file__)
    p.add_argument("--data-root", default=d["data_root"])
    p.add_argument("--fold", type=int, default=d["fold"], choices=FOLDS)
    p.add_argument("--out", help="output folder for augmented copies (outside the dataset)")
    p.add_argument("--factor", type=Number(int, 1, MAX_FACTOR), default=d["factor"], help="copies per Train image")
    p.add_argument("--balance", action="store_true", help="top every class up to the largest class instead")
    p.add_argument("--ops", default=d["ops"], help=f"comma list of {','.join(OP_NAMES)} or 'all'")
    p.add_argument("--seed", type=SEED, default=d["seed"])
    cores = os.cpu_count() or 1  # more processes than a few per core only fill the memory (each imports torch)
    p.add_argument("--workers", type=Number(int, 0, 4 * cores), default=d["workers"], help="processes (0 = all cores)")
    p.add_argument("--benchmark", action="store_true", help="print images/s of the three input pipelines")
    p.add_argument("--size", type=Number(int, 8, 1024), default=d["size"], help="benchmark image size")
    p.add_argument("--augment", default=d["augment"], choices=["basic", "trivial"],
                   help="benchmark: train.py's op set to time")
    p.add_argument("--batch-size", type=at_least_1, default=d["batch_size"], help="benchmark batch size")
    return p.parse_args(argv)


def run(args) -> None:
    # a flag of the other mode, or --factor beside --balance, was ignored without a word
    if args.benchmark:
        refuse_unused(args, DEFAULTS, ["out", "factor", "balance", "ops", "seed"],
                      "is not used by --benchmark, which times train.py's pipelines; leave it out")
    else:
        refuse_unused(args, DEFAULTS, ["size", "augment", "batch_size"], "is the benchmark's: use it with --benchmark")
    if args.balance:
        refuse_unused(args, DEFAULTS, ["factor"], "is not used by --balance, which tops every class up to the largest")
    if args.benchmark:
        rows = benchmark(args.data_root, args.fold, args.size, args.batch_size, args.workers, args.augment)
        print(f"\ninput pipeline, fold {args.fold} Train, {args.size}x{args.size}, batch {args.batch_size}, "
              f"--augment {args.augment}:")
        print(f"{'path':<44}{'images/s':>10}")
        for name, rate in rows:
            print(f"{name:<44}{rate:>10.0f}" if rate == rate else f"{name:<44}{'no CUDA':>10}")
        return
    if not args.out:
        raise DataError("--out is required: the folder to write augmented copies to")
    write_augmented(args.data_root, args.fold, args.out, None if args.balance else args.factor,
                    args.balance, args.ops, args.seed, args.workers)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
