"""Every transform in the project, and an offline writer of augmented copies.

    python augment.py --data-root PATH --fold 1 --factor 5 --out data/aug/fold1   # N copies per Train image
    python augment.py --data-root PATH --fold 1 --balance --out data/aug/fold1-bal  # top classes up
    python augment.py --benchmark --data-root PATH                                  # images/s table

Two implementations of the same random augmentations, drawing from the same parameter ranges:
- per image, with torchvision.transforms.v2 (`train_transform`, `simclr_transform`), for DataLoaders;
- per batch, on uint8 tensors already on the device (`BatchAugment`), so that with the decoded
  dataset on the GPU an epoch needs no CPU work per image. train.py and simclr.py use this one.
Colour changes stay mild and never rotate hue: lesion colour is diagnostic.
"""
import argparse
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from getData import (AUG_TAG, DataError, MSLDDataset, decode_all, derived_seed, find_folds_root, index_split,
                     list_classes, load_image, prepare, resize_size, seed_worker)

DEFAULTS = dict(data_root="data", fold=1, factor=5, ops="all", seed=0, workers=0, size=224, batch_size=64)

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: torchvision's pretrained weights expect them
STD = (0.229, 0.224, 0.225)

# Supervised training: crops keep >= 70% of the lesion area; lesions have no canonical orientation.
TRAIN_OPS = dict(crop=dict(scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)), hflip=dict(p=0.5), vflip=dict(p=0.5),
                 color=dict(brightness=0.2, contrast=0.2, saturation=0.2, p=1.0))
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


# ----------------------------------------------------------------------------- per-image (torchvision)
def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] (B, 3, H, W) -> normalised with the ImageNet mean/std."""
    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean).div_(std)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def to_input(x_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation on cached uint8 images (B, 3, S', S'): centre crop to `size`, scale, normalise."""
    return normalize(center_crop(x_uint8, size).float().div_(255))


def eval_transform(size: int):
    """PIL image -> model input: the same resize/crop as the cache, so files and cache agree exactly."""
    return lambda im: to_input(prepare(im, resize_size(size))[None], size)[0]


def _v2_ops(size: int, ops: dict) -> list:
    crop, color = ops["crop"], ops["color"]
    jitter = v2.ColorJitter(color["brightness"], color["contrast"], color["saturation"])
    out = [v2.RandomResizedCrop(size, scale=crop["scale"], ratio=crop["ratio"], antialias=True),
           v2.RandomHorizontalFlip(ops["hflip"]["p"]), v2.RandomVerticalFlip(ops["vflip"]["p"]),
           v2.ToDtype(torch.float32, scale=True), v2.RandomApply([jitter], p=color["p"])]
    if color.get("grey"):
        out.append(v2.RandomGrayscale(color["grey"]))
    if "blur" in ops:
        sigma = ops["blur"]["sigma"]
        out.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(sigma[1], size), sigma)], p=ops["blur"]["p"]))
    return out


def train_transform(size: int):
    """Per-image training augmentation (PIL or uint8 tensor in): the DataLoader counterpart of BatchAugment."""
    return v2.Compose([v2.ToImage(), *_v2_ops(size, TRAIN_OPS), v2.Normalize(MEAN, STD)])


class TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, x):
        return self.transform(x), self.transform(x)


def simclr_transform(size: int):
    """Per-image SimCLR: two independent views of each image."""
    return TwoViews(v2.Compose([v2.ToImage(), *_v2_ops(size, SIMCLR_OPS), v2.Normalize(MEAN, STD)]))


# ----------------------------------------------------------------------------- batched ops
# Each op takes a float batch in [0, 1] (B, 3, H, W) and a CPU torch.Generator; per-sample random
# parameters are drawn on the CPU (a few numbers per image) so results do not depend on the device.
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


def geometric(x, gen, out_size=None, crop=None, affine=None, hflip=None, vflip=None):
    """Crop-and-resize, rotation/shear/translation/zoom and flips, composed into one grid_sample per batch."""
    n, _, height, width = x.shape
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else (out_size or (height, width))
    one, zero = torch.ones(n), torch.zeros(n)
    w, h, cx, cy = one, one, zero, zero
    if crop:
        w2, h2, cx2, cy2 = _crop_boxes(gen, n, crop["scale"], crop["ratio"])
        use = _coin(gen, n, crop.get("p", 1.0))
        w, h, cx, cy = (torch.where(use, a, b) for a, b in ((w2, w), (h2, h), (cx2, cx), (cy2, cy)))
    angle, shear, zoom, tx, ty = zero, zero, one, zero, zero
    if affine:
        use = _coin(gen, n, affine["p"]).float()
        angle = use * torch.deg2rad(_uniform(gen, n, -affine["degrees"], affine["degrees"]))
        shear = use * torch.deg2rad(_uniform(gen, n, -affine["shear"], affine["shear"]))
        zoom = 1 + use * (_uniform(gen, n, *affine["scale"]) - 1)
        tx, ty = (use * _uniform(gen, n, -2 * affine["translate"], 2 * affine["translate"]) for _ in range(2))
    fx = torch.where(_coin(gen, n, hflip["p"]), -one, one) if hflip else one
    fy = torch.where(_coin(gen, n, vflip["p"]), -one, one) if vflip else one
    # Output coords u (normalised [-1, 1]) -> input coords: c + D^-1 R Sh D diag(w, h) F u / zoom,
    # with D = diag(aspect, 1) so rotations are rigid in pixels on non-square images.
    aspect = width / height
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    rot = torch.stack([torch.stack([cos, -sin / aspect], -1), torch.stack([sin * aspect, cos], -1)], 1)  # D^-1 R D
    rot = rot @ torch.stack([torch.stack([one, tan / aspect], -1), torch.stack([zero, one], -1)], 1)  # shear
    lin = rot * torch.stack([w * fx, h * fy], -1)[:, None, :] / zoom[:, None, None]
    theta = torch.cat([lin, torch.stack([cx + tx, cy + ty], -1)[:, :, None]], 2).to(x)
    grid = F.affine_grid(theta, [n, x.shape[1], out_h, out_w], align_corners=False)
    return grid_sample(x, grid)


def grid_sample(x, grid):
    # Reflection instead of black corners: skin continues past the photo's edge.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, with torchvision's rounding


def color(x, gen, brightness, contrast, saturation, p=1.0, grey=0.0):
    """ColorJitter without hue, as one per-image 3x3 colour matrix and offset (a single pass).

    torchvision's formulas in the order brightness, contrast, saturation; it clamps after each step,
    we clamp once at the end (differs only for pixels pushed past white and back).
    """
    n = x.shape[0]
    use = _coin(gen, n, p)
    b, c, s = (torch.where(use, _uniform(gen, n, 1 - v, 1 + v), torch.ones(n))
               for v in (brightness, contrast, saturation))
    if grey:
        s = torch.where(_coin(gen, n, grey), torch.zeros(n), s)  # saturation 0 is RandomGrayscale
    b, c, s = (v.to(x) for v in (b, c, s))
    w = torch.tensor(GREY).to(x)
    mean_grey = (x.mean((2, 3)) @ w) * b  # mean luma after brightness
    sat = s.view(-1, 1, 1) * torch.eye(3).to(x) + (1 - s).view(-1, 1, 1) * w.view(1, 1, 3)  # blend with grey
    matrix = sat * (b * c).view(-1, 1, 1)
    offset = sat.sum(2) * ((1 - c) * mean_grey).view(-1, 1)  # contrast pulls towards the mean luma
    y = torch.baddbmm(offset[:, :, None], matrix, x.flatten(2))
    return y.view_as(x).clamp_(0, 1)


def gamma(x, gen, gamma, p):
    g = _uniform(gen, x.shape[0], *gamma).to(x).view(-1, 1, 1, 1)
    return _where(_coin(gen, x.shape[0], p), x.clamp_min(1e-6) ** g, x)


def _blur_kernel(sigma_max, size):
    return min(2 * math.ceil(3 * sigma_max) + 1, (size // 2) * 2 - 1)


def blur(x, gen, sigma, p):
    """Gaussian blur with a per-image sigma: one grouped, separable convolution for the batch."""
    n, ch, height, width = x.shape
    k = _blur_kernel(sigma[1], min(height, width))
    s = _uniform(gen, n, *sigma).to(x)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-0.5 * (t[None] / s[:, None]) ** 2)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (n*ch, k)
    y = x.reshape(1, n * ch, height, width)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern[:, None, None, :], groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern[:, None, :, None], groups=n * ch)
    return _where(_coin(gen, n, p), y.view(n, ch, height, width), x)


def noise(x, gen, std, p):
    """Additive Gaussian noise; the per-pixel draw uses a device generator seeded from `gen`."""
    n = x.shape[0]
    s = _uniform(gen, n, *std).to(x).view(-1, 1, 1, 1)
    dev_gen = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    y = (x + s * torch.randn(x.shape, generator=dev_gen, device=x.device, dtype=x.dtype)).clamp(0, 1)
    return _where(_coin(gen, n, p), y, x)


def cutout(x, gen, size, p):
    """One grey rectangle per image (DeVries & Taylor 2017), sides a random fraction of the image."""
    n, _, height, width = x.shape
    sh, sw = (_uniform(gen, n, *size) * side for side in (height, width))
    cy, cx = _uniform(gen, n, 0, height), _uniform(gen, n, 0, width)
    use = _coin(gen, n, p)
    sh, sw, cy, cx, use = (v.to(x.device).view(-1, 1, 1) for v in (sh, sw, cy, cx, use))
    ys = torch.arange(height, device=x.device).view(1, -1, 1) + 0.5
    xs = torch.arange(width, device=x.device).view(1, 1, -1) + 0.5
    box = ((ys - cy).abs() < sh / 2) & ((xs - cx).abs() < sw / 2) & use
    return torch.where(box[:, None], torch.full_like(x, 0.5), x)


PIXEL_OPS = {"color": color, "gamma": gamma, "blur": blur, "noise": noise, "cutout": cutout}
GEOMETRIC_OPS = ("crop", "affine", "hflip", "vflip")
OP_NAMES = tuple(OFFLINE_OPS)


def augment_batch(x: torch.Tensor, gen: torch.Generator, ops: dict, out_size=None) -> torch.Tensor:
    """Apply `ops` (name -> parameters) to a float [0, 1] batch: geometry first, then pixel ops."""
    geo = {k: ops[k] for k in GEOMETRIC_OPS if k in ops}
    if geo or out_size:
        x = geometric(x, gen, out_size, **geo)
    for name in ("color", "gamma", "blur", "noise", "cutout"):
        if name in ops:
            x = PIXEL_OPS[name](x, gen, **ops[name])
    return x


class BatchAugment:
    """uint8 batch (B, 3, S', S') on any device -> augmented, normalised float batch (B, 3, size, size)."""

    def __init__(self, size: int, ops: dict = TRAIN_OPS):
        self.size, self.ops = size, ops

    def __call__(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return normalize(augment_batch(x_uint8.float().div_(255), gen, self.ops, self.size))


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
    x = torch.from_numpy(np.asarray(load_image(src))).permute(2, 0, 1)[None].float() / 255
    y = augment_batch(x, torch.Generator().manual_seed(seed), ops)
    Image.fromarray((y[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()).save(dst, quality=95)


def _init_worker():
    torch.set_num_threads(1)  # one process per core instead of threads fighting over cores


def write_augmented(data_root, fold: int, out, factor: int | None = None, balance: bool = False,
                    ops: str = "all", seed: int = 0, workers: int = 0) -> dict:
    """Write augmented copies of fold `fold`'s Train images to `out/<Class>/NAME__augNN.jpg`."""
    folds_root = find_folds_root(data_root)
    out = Path(out).resolve()
    if out.is_relative_to(folds_root.resolve()) or out.is_relative_to(Path(data_root).resolve()):
        raise DataError(f"--out {out}: inside the source dataset; write augmented copies elsewhere")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out}: exists and is not empty; choose a new folder")
    if not balance and (factor is None or factor < 1):
        raise DataError(f"--factor {factor}: must be 1 or more (or use --balance)")
    op_params = parse_ops(ops)
    classes = list_classes(folds_root)
    samples = index_split(folds_root, fold, "Train", classes)  # never Valid or Test
    plan = plan_copies(samples, classes, factor, balance)
    width = max(2, len(str(max((j for *_, j in plan), default=0))))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for c in classes:
            (tmp / c).mkdir()
        tasks = [(src, tmp / c / f"{src.stem}{AUG_TAG}{j:0{width}d}.jpg",
                  derived_seed(seed, fold, i, j), op_params) for i, (src, c, j) in enumerate(plan)]
        workers = workers or os.cpu_count() or 1
        with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            for _ in tqdm(pool.imap_unordered(_write_one, tasks, chunksize=8), total=len(tasks), desc="augment"):
                pass
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = {c: sum(1 for _, cc, _ in plan if cc == c) for c in classes}
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


def benchmark(data_root, fold: int, size: int, batch_size: int, workers: int) -> list[tuple[str, float]]:
    """images/s of one training epoch's input pipeline, three ways, at `size` x `size`."""
    folds_root = find_folds_root(data_root)
    ds = MSLDDataset(folds_root, fold, "Train", transform=train_transform(size))
    workers = workers or os.cpu_count() or 1
    loader = torch.utils.data.DataLoader(ds, batch_size, shuffle=True, num_workers=workers,
                                         worker_init_fn=seed_worker, persistent_workers=True)
    rows = [("DataLoader + PIL decode + torchvision v2", _rate(lambda: [b for b in loader], len(ds)))]
    cache = decode_all(ds.paths, resize_size(size))
    aug, gen = BatchAugment(size), torch.Generator().manual_seed(0)

    def epoch(images):
        for i in range(0, len(images), batch_size):
            aug(images[i:i + batch_size], gen)
        if images.is_cuda:
            torch.cuda.synchronize()

    rows.append(("uint8 cache on CPU + BatchAugment", _rate(lambda: epoch(cache), len(ds))))
    if torch.cuda.is_available():
        gpu = cache.cuda()
        rows.append(("uint8 cache on GPU + BatchAugment", _rate(lambda: epoch(gpu), len(ds))))
    else:
        rows.append(("uint8 cache on GPU + BatchAugment", float("nan")))
    return rows


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data-root", default=DEFAULTS["data_root"])
    p.add_argument("--fold", type=int, default=DEFAULTS["fold"])
    p.add_argument("--out", help="output folder for augmented copies (outside the dataset)")
    p.add_argument("--factor", type=int, default=DEFAULTS["factor"], help="copies per Train image")
    p.add_argument("--balance", action="store_true", help="top every class up to the largest class instead")
    p.add_argument("--ops", default=DEFAULTS["ops"], help=f"comma list of {','.join(OP_NAMES)} or 'all'")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--workers", type=int, default=DEFAULTS["workers"], help="processes (0 = all cores)")
    p.add_argument("--benchmark", action="store_true", help="print images/s of the three input pipelines")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="benchmark image size")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="benchmark batch size")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.benchmark:
            rows = benchmark(args.data_root, args.fold, args.size, args.batch_size, args.workers)
            print(f"\ninput pipeline, fold {args.fold} Train, {args.size}x{args.size}, batch {args.batch_size}:")
            print(f"{'path':<44}{'images/s':>10}")
            for name, rate in rows:
                print(f"{name:<44}{rate:>10.0f}" if rate == rate else f"{name:<44}{'no CUDA':>10}")
            return 0
        if not args.out:
            raise DataError("--out is required: the folder to write augmented copies to")
        write_augmented(args.data_root, args.fold, args.out, None if args.balance else args.factor,
                        args.balance, args.ops, args.seed, args.workers)
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
