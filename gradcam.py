"""Grad-CAM (Selvaraju et al. 2017) by hand, with hooks, for every model of models/, and the checks
that a map explains anything.

    python gradcam.py --checkpoint runs/lenet-fold1/best.pt photo1.jpg photo2.jpg
    python gradcam.py --checkpoint runs/lenet-fold1/best.pt --fold 1 --split Test --limit 24
    python gradcam.py --checkpoint runs/x/best.pt --target-class Monkeypox --layer layer3 photo.jpg
    python gradcam.py --checkpoint runs/recipe --faithfulness --sanity --limit 500   # every fold's Test split

Per image: a PNG with the photo, the heat-map overlay and the predicted class with its probability
(calibrated by the checkpoint's temperature, as testing.py and serve.py give it);
plus grid.png for the whole set (photos the out-of-distribution gate turns away framed in red).
--faithfulness: deletion and insertion curves (Petsiuk et al. 2018) of Grad-CAM at each layer against
a random map and a centred blob; --sanity: cascading randomisation (Adebayo et al. 2018). Written to
runs/NAME/gradcam/ (or --out, never a training run's own folder) with config.json, the command's
resolved arguments. The photos are only read.
"""
import collections
import copy
import dataclasses
import functools
import io
import math
import os
import re
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from tqdm import tqdm

from getData import (FOLDS, DataError, Number, Parser, atomic_path, atomic_write, check_images, each_once, images_in,
                     index_split, load_image, prepare, refuse_unused, run_main, to_json, usable_folds_root)
from models import (MEAN, MEMORY_FORMATS, PRECISION_HELP, PRECISIONS, SCORES, STD, ModelError, Runtime,
                    capture_features, crop, drawable, find_checkpoints, gate, gate_by, load_classifier, mean_std,
                    output_folder, photos_seen, probabilities, reference_for, resize_size, save_figure, select_runtime,
                    to_input)

DEFAULTS = dict(checkpoint=None, out=None, fold=None, split="Test", limit=None, layer=None, target_class=None,
                alpha=0.45, cmap="jet", device="auto", precision="auto", memory_format="auto", batch_size=16,
                faithfulness=False, sanity=False, ood_score=None)
DISPLAY_SIZE = 224  # overlays are drawn at least this large, also for LeNet's 32x32 input
SPLIT_LIMIT = 24  # images of a fold's split explained without --limit: a grid of four rows
GRID_MAX = 48  # photos in grid.png (8 rows of 6): a folder of thousands made a 130-megapixel PNG
# what the script writes in --out; output_folder refuses a folder holding anything else
OUTPUTS = re.compile(r".+_gradcam\.png|grid\.png|config\.json|summary\.md|explains\.md|faithfulness\.(json|png)"
                     r"|sanity\.json|sanity_.+\.png|fold[1-5]")


class GradCAM:
    """Context manager: hooks on `layer` while inside `with`, none after (also after an exception).

        with GradCAM(model) as cam:
            heatmaps, probs = cam(x)            # x: normalised batch; one target per image
            logits = cam.forward(x)             # or in two steps, to choose the targets in between
            heatmaps = cam.maps(logits, targets)
    """

    def __init__(self, model: nn.Module, layer: str | None = None, layout: str | None = None):
        self.model = model
        default = getattr(model, "cam_layer", None)
        if layer and not _has_module(model, layer) and _has_module(model, f"backbone.{layer}"):
            layer = f"backbone.{layer}"  # `layer3` for `backbone.layer3`
        self.layer_name = layer or default
        self.layout = layout or (getattr(model, "cam_layout", "nchw") if layer in (None, default) else "nchw")
        if not _has_module(model, self.layer_name):
            names = ", ".join(n for n, _ in model.named_children())
            offered = ", ".join(getattr(model, "cam_candidates", []) or [])
            raise ModelError(f"--layer {self.layer_name}: no such module in {type(model).__name__} "
                             f"(top-level modules: {names}" + (f"; offered: {offered})" if offered else ")"))
        self.layer = model.get_submodule(self.layer_name)
        self.handles, self.activations, self.gradients, self.input = [], None, None, None

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.handles.append(self.layer.register_forward_hook(self._save_activation))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.activations = self.gradients = self.input = None
        self.model.train(self.was_training)
        return False  # never swallow the exception

    def _save_activation(self, module, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if out.ndim != (3 if self.layout == "tokens" else 4):
            raise ModelError(f"--layer {self.layer_name}: its output {tuple(out.shape)} is not a spatial map; choose "
                             f"a convolutional block (default: {getattr(self.model, 'cam_layer', None)})")
        self.activations = out.detach()
        if out.requires_grad:  # a plain no_grad forward inside the block builds no graph to hook
            self.handles.append(out.register_hook(self._save_gradient))

    def _save_gradient(self, grad):
        self.gradients = grad.detach()

    def _to_nchw(self, t: torch.Tensor) -> torch.Tensor:
        if self.layout == "nhwc":  # Swin
            return t.permute(0, 3, 1, 2)
        if self.layout == "tokens":  # ViT: drop the class token, tokens back onto their grid
            t = t[:, 1:]
            side = int(round(t.shape[1] ** 0.5))
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
        return t

    def forward(self, x: torch.Tensor, rt=None) -> torch.Tensor:
        """The model's float32 logits for a normalised batch, with the graph kept for maps(). `rt`:
        run it the fast way (models.Runtime: device, bf16, channels_last); plain fp32 otherwise."""
        if not self.handles:
            raise RuntimeError("use GradCAM inside a `with` block")
        with torch.enable_grad():  # works even when the caller is inside torch.no_grad()
            x = x.detach().requires_grad_(True)  # activations need a graph even if weights are frozen
            self.input = x
            return rt.forward(self.model, x) if rt is not None else self.model(x).float()

    def maps(self, logits: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """CAMs (B, H, W) in [0, 1] at the input size, explaining `target` (per image; default: the
        top class) with the activations and gradients of the forward() that gave `logits`."""
        target = logits.argmax(1) if target is None else torch.as_tensor(target, device=logits.device).view(-1)
        # Samples do not interact in eval mode, so one backward of the summed scores gives every
        # image its own gradient. autograd.grad fires the tensor hook and leaves .grad untouched.
        with torch.enable_grad():
            torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), self.input)
        acts, grads = self._to_nchw(self.activations.float()), self._to_nchw(self.gradients.float())
        cam = F.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=self.input.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
        self.input = None
        return ((cam - low) / (high - low).clamp_min(1e-8)).detach()

    def __call__(self, x: torch.Tensor, target: torch.Tensor | None = None,
                 rt=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CAMs (B, H, W) in [0, 1] at the input size, class probabilities (B, C)) for one batch."""
        logits = self.forward(x, rt)
        return self.maps(logits, target), logits.softmax(1).detach()


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """uint8 RGB (H, W, 3) + CAM (h, w) in [0, 1] -> uint8 RGB blend at the image's size. The map is
    enlarged by Pillow's bilinear filter (F.interpolate's pixel-centred bilinear, to 1e-7) and never by
    a torch kernel: serve.py draws in each connection's thread, and a live thread that has run one keeps
    an OpenMP team of its own, and the inference thread pays for it (README: Web service)."""
    height, width = image.shape[:2]
    cam = np.asarray(Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR))
    heat = matplotlib.colormaps[cmap](cam)[..., :3]
    return (255 * ((1 - alpha) * image / 255.0 + alpha * heat)).clip(0, 255).astype(np.uint8)


def overlay_png(shown: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> bytes:
    """The overlay as PNG bytes, for serve.py: no files written."""
    buf = io.BytesIO()
    Image.fromarray(overlay(shown, cam, alpha)).save(buf, format="PNG")
    return buf.getvalue()


def display_crop(image, input_size: int) -> np.ndarray:
    """The region the model sees, as uint8 RGB (H, W, 3) at least DISPLAY_SIZE wide (LeNet sees 32x32)."""
    size = max(input_size, DISPLAY_SIZE)
    return crop(prepare(image, resize_size(size)), size).permute(1, 2, 0).numpy()


@dataclasses.dataclass
class Explained:
    """One image's explanation: class probabilities, the overlay and the crop it is drawn on, and
    whether the OOD gate keeps the image (None without a reference)."""
    probs: np.ndarray
    overlay: np.ndarray
    shown: np.ndarray
    in_distribution: bool | None = None


def run_gradcam(model, images, rt, target=None, layer=None, alpha=0.45, cmap="jet", batch_size=16,
                reference=None, temperature: float = 1.0) -> list[Explained]:
    """PIL images -> their explanations; with an OOD `reference` (models.ood) each is also gated. The
    probabilities are calibrated by the checkpoint's `temperature`, as testing.py's and serve.py's are."""
    results, size = [], model.input_size
    with GradCAM(model, layer) as cam, capture_features(model) as features:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = to_input(torch.stack([prepare(im, resize_size(size)) for im in chunk]), size).to(rt.device)
            tgt = None if target is None else torch.full((len(chunk),), target, dtype=torch.long)
            logits = cam.forward(x, rt)
            maps, probs = cam.maps(logits, tgt), probabilities(logits.detach()[None], temperature)  # one view
            kept = gate(reference, features[-1], logits.detach())[1].cpu().tolist() if reference else [None] * len(x)
            shown = [display_crop(im, size) for im in chunk]
            results += [Explained(p.cpu().numpy(), overlay(s, m.cpu().numpy(), alpha, cmap), s, k)
                        for p, m, s, k in zip(probs, maps, shown, kept)]
    return results


def _figure(e: Explained, classes, target, title) -> Figure:
    """The crop the model sees beside its overlay, titled with the photo's name and the answer. Laid
    out once by hand, with no ticks for matplotlib to measure: tight_layout and the hidden axes' ticks
    took 0.07 s of the 0.24 s a photo cost, nearly all of which is drawing (README: Grad-CAM)."""
    pred = int(np.argmax(e.probs))
    explained = f"; map for {classes[target]}" if target is not None and target != pred else ""
    fig = Figure(figsize=(7, 3.8))
    axes = fig.subplots(1, 2, gridspec_kw=dict(left=0.02, right=0.98, bottom=0.02, top=0.88, wspace=0.05))
    titles = (_lines(title, 48), _lines(_caption(e, classes) + explained, 46))  # characters a line at 8 and 10 pt
    colours = ("black", "black" if e.in_distribution is not False else "tab:red")
    for ax, picture, text, size, colour in zip(axes, (e.shown, e.overlay), titles, (8, 10), colours):
        ax.imshow(picture)
        ax.set_title(drawable(text), fontsize=size, color=colour)
        ax.set(xticks=[], yticks=[])
        ax.axis("off")
    return fig


def _lines(text: str, width: int) -> str:
    """`text` in at most two lines of `width` characters (a long file name goes on over them otherwise,
    beyond the figure's edge), the rest elided."""
    lines = textwrap.wrap(text, width, break_on_hyphens=False)
    if len(lines) > 2:
        lines = [lines[0], lines[1][:width - 1] + "\u2026"]
    return "\n".join(lines)


def _caption(e: Explained, classes) -> str:
    """The predicted class and probability; an image the OOD gate turns away is marked as such."""
    pred = int(np.argmax(e.probs))
    return f"{'OOD: not like the training photos; ' if e.in_distribution is False else ''}" \
           f"{classes[pred]} {e.probs[pred]:.2f}"


def overlay_names(paths) -> list[str]:
    """A file name per image, never one twice: photos of one name in different folders (a/x.jpg,
    b/x.png) get x_gradcam.png and x-2_gradcam.png rather than one overwriting the other."""
    used, names = set(), []
    for path in map(Path, paths):
        stem = os.fsdecode(os.fsencode(path.stem)[:200])  # with the suffix, within a file name's 255 bytes
        name, k = f"{stem}_gradcam.png", 1
        while name in used:
            k += 1
            name = f"{stem}-{k}_gradcam.png"
        used.add(name)
        names.append(name)
    return names


def shown_name(path) -> str:
    """A file's name as a figure can draw it: bytes that are not UTF-8 (which Python keeps as surrogates,
    and matplotlib refuses with a traceback) shown as \\xNN."""
    return os.fsencode(Path(path).name).decode("utf-8", "backslashreplace")


def write_overlays(explain, paths, input_size: int, batch: int, classes, out: Path, target=None) -> list[Explained]:
    """One overlay figure per photo, `explain`ed (run_gradcam) a batch at a time: a folder of photos
    costs what a batch does (decoded and drawn, all were held until the end: 1.8 GB for 2,184 photos).
    Returns every photo's explanation, those after the first GRID_MAX without their pictures."""
    results, files = [], overlay_names(paths)
    with tqdm(total=len(paths), desc="overlays", leave=False, disable=None) as bar:  # a sixth of a second each
        for i in range(0, len(paths), batch):
            for e, path, file in zip(explain(load_images(paths[i:i + batch], input_size)), paths[i:], files[i:]):
                save_figure(_figure(e, classes, target, shown_name(path)), out / file)
                results.append(e if len(results) < GRID_MAX else dataclasses.replace(e, overlay=None, shown=None))
                bar.update()
    return results


def write_grid(results: list[Explained], names, classes, out: Path) -> None:
    """grid.png: the first GRID_MAX images' overlays (the only ones `results` still holds)."""
    shown = results[:GRID_MAX]
    cols = min(6, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(2.2 * cols, 2.7 * rows))
    if len(results) > len(shown):
        fig.suptitle(f"the first {len(shown)} of {len(results)} photos; each has its own overlay file", fontsize=9)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])  # none to measure when titles are placed: a quarter of its time
        ax.axis("off")
    for ax, e, name in zip(axes.flat, shown, names):
        ax.imshow(e.overlay)
        ood = e.in_distribution is False
        ax.set_title(drawable(f"{'OOD ' if ood else ''}{classes[int(np.argmax(e.probs))]} {e.probs.max():.2f}\n"
                              f"{shown_name(name)}"), fontsize=7, color="tab:red" if ood else "black")
        if ood:  # a red frame: this photo is unlike the training photos, its map explains nothing useful
            ax.axis("on")
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red")
                spine.set_linewidth(3)
    fig.tight_layout()
    save_figure(fig, out / "grid.png")


# ----------------------------------------------------------------------------- does the map explain?
STEPS = 25  # pixels removed or revealed 4% at a time
RISE_SIGMA = 5.0  # the blur of RISE's insertion baseline at 224 px (Petsiuk et al. 2018), scaled to the input


def blurred(x: torch.Tensor) -> torch.Tensor:
    """The baseline that deletion puts in and insertion starts from: the image itself, Gaussian-blurred
    (RISE's insertion baseline, used for deletion too): it removes the lesion's detail but keeps the
    colours and brightness of the photo, where black or grey patches would add sharp edges of their own
    that the network reacts to (a test of the network's response to holes, not of the map)."""
    sigma = RISE_SIGMA * x.shape[-1] / 224
    k = 2 * int(2 * sigma) + 1
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1)
    y = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=x.shape[1])
    return F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kernel[:, None, :, None], groups=x.shape[1])


def baseline_maps(n: int, size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Two maps that know nothing of the network: uniform noise, and a centred Gaussian (sigma a
    quarter of the side: lesion photos are mostly centred, so the centre is a fair guess)."""
    yy, xx = torch.meshgrid(torch.arange(size) - (size - 1) / 2, torch.arange(size) - (size - 1) / 2, indexing="ij")
    centre = torch.exp(-(xx ** 2 + yy ** 2) / (2 * (size / 4) ** 2))
    return dict(random=torch.rand(n, size, size, generator=gen), centre=centre.expand(n, size, size).clone())


def pixel_order(maps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image's pixel indices, most important first; equal values (Grad-CAM's ReLU leaves many
    zeros) in a random order, not in raster order, which would favour the top of the image."""
    jitter = torch.rand(maps.shape, generator=gen) * 1e-6
    return (maps.cpu() + jitter).flatten(1).argsort(1, descending=True)


@torch.no_grad()
def deletion_insertion(model, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor, rt, gen: torch.Generator,
                       steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Petsiuk et al. 2018 (RISE): the probability of `target` as the pixels are deleted (replaced by
    the blurred image) or inserted (into the blurred image) in the order of `maps`, `steps` steps of
    an equal share. One forward per step for the whole batch. (N, steps + 1) each: column 0 is the
    unmodified image for deletion, the blurred one for insertion; the last, the reverse."""
    n, _, h, w = x.shape
    base, order = blurred(x), pixel_order(maps, gen).to(x.device)
    deletion, insertion = [], []
    for s in range(steps + 1):
        mask = torch.zeros(n, h * w, device=x.device)
        mask.scatter_(1, order[:, :round(s * h * w / steps)], 1.0)
        mask = mask.view(n, 1, h, w)
        both = torch.cat([x * (1 - mask) + base * mask, base * (1 - mask) + x * mask])
        probs = rt.forward(model, both).softmax(1).gather(1, target.repeat(2).view(-1, 1))[:, 0]
        deletion.append(probs[:n])
        insertion.append(probs[n:])
    return torch.stack(deletion, 1).cpu(), torch.stack(insertion, 1).cpu()


def curve_area(curves: torch.Tensor) -> torch.Tensor:
    """Area under each curve over the fraction of pixels 0..1 (trapezoids): deletion lower is better,
    insertion higher is better."""
    return torch.trapezoid(curves, dx=1 / (curves.shape[1] - 1), dim=1)


def inputs_and_targets(model, images, rt, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised inputs of PIL images and the class the network predicts for each."""
    size = model.input_size
    x = to_input(torch.stack([prepare(im, resize_size(size)) for im in images]), size).to(rt.device)
    with torch.no_grad():
        target = torch.cat([rt.forward(model, x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return x, target


def cam_maps(model, x, target, rt, layer: str, batch_size: int) -> torch.Tensor:
    with GradCAM(model, layer) as cam:
        return torch.cat([cam(x[i:i + batch_size], target[i:i + batch_size], rt)[0]
                          for i in range(0, len(x), batch_size)])


def faithfulness(model, images, rt, layers, batch_size: int, seed: int = 0) -> dict:
    """Deletion and insertion curves and their areas for Grad-CAM at each layer and the two baselines,
    the predicted class explained (mean over images; the curves too, for the figure)."""
    x, target = inputs_and_targets(model, images, rt, batch_size)
    gen = torch.Generator().manual_seed(seed)
    maps = {f"gradcam {layer.removeprefix('backbone.')}": cam_maps(model, x, target, rt, layer, batch_size)
            for layer in layers}
    maps.update(baseline_maps(len(x), model.input_size, gen))
    out = dict(n=len(x), steps=STEPS, baseline=f"Gaussian blur, sigma {RISE_SIGMA * model.input_size / 224:.1f} px",
               maps={})
    for name, m in tqdm(maps.items(), desc="deletion/insertion", leave=False, disable=None):
        deletion, insertion = [], []
        for i in range(0, len(x), batch_size):
            d, ins = deletion_insertion(model, x[i:i + batch_size], target[i:i + batch_size], m[i:i + batch_size], rt,
                                        gen)
            deletion.append(d)
            insertion.append(ins)
        deletion, insertion = torch.cat(deletion), torch.cat(insertion)
        out["maps"][name] = dict(deletion_auc=float(curve_area(deletion).mean()),
                                 insertion_auc=float(curve_area(insertion).mean()),
                                 deletion_curve=deletion.mean(0).tolist(), insertion_curve=insertion.mean(0).tolist())
    return out


def cascade(model) -> list[tuple[str, nn.Module]]:
    """Adebayo et al. 2018's cascading randomisation order: the head, then the backbone's blocks with
    weights from the top down (for a ResNet: layer4, layer3, layer2, layer1, bn1, conv1)."""
    blocks = [(n, m) for n, m in model.backbone.named_children() if any(True for _ in m.parameters())]
    return [("head", model.head)] + blocks[::-1]


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row of `a` with the same row of `b` (ties get their average
    rank, as scipy.stats.spearmanr gives them; a constant row correlates with nothing: NaN)."""
    ra, rb = (torch.from_numpy(np.stack([_average_ranks(r) for r in t.flatten(1).double().cpu().numpy()]))
              for t in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # the rank of each distinct value's first occurrence
    return (first + (counts - 1) / 2)[inverse]


def _agreement(rho: torch.Tensor) -> dict:
    """Mean and std over images of their maps' rank correlations; constant maps (NaN) counted apart."""
    ok = ~rho.isnan()
    return dict(spearman=float(rho.nanmean()), spearman_std=float(rho[ok].std()) if ok.sum() > 1 else math.nan,
                constant_maps=int((~ok).sum()))


def randomisation(model, images, rt, layers, batch_size: int, seed: int = 0) -> dict:
    """For each layer: the Spearman correlation between the trained network's maps and those of the
    network re-initialised cumulatively from the head down (mean and std over images; the predicted
    class of the trained network explained throughout). A map that explains the network falls towards
    0 as its weights go; one that draws edges stays up (Adebayo et al. 2018)."""
    x, target = inputs_and_targets(model, images, rt, batch_size)
    trained = {layer: cam_maps(model, x, target, rt, layer, batch_size) for layer in layers}
    random_model = copy.deepcopy(model)
    out = {layer.removeprefix("backbone."): [] for layer in layers}
    examples = {layer.removeprefix("backbone."): [trained[layer][:4].cpu()] for layer in layers}
    # reset_parameters draws from torch's global generator (the device's, on CUDA): seeded here, for
    # the same new weights every run, inside a fork that gives the caller its streams back unchanged
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, block in tqdm(cascade(random_model), desc="randomisation", leave=False, disable=None):
            for m in block.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            for layer in layers:
                maps = cam_maps(random_model, x, target, rt, layer, batch_size)
                short = layer.removeprefix("backbone.")
                out[short].append(dict(randomised=name, **_agreement(spearman(trained[layer], maps))))
                examples[short].append(maps[:4].cpu())
    photos = (x[:4].cpu() * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).clamp(0, 1)
    return dict(n=len(x), layers=out, examples={k: torch.stack(v, 1) for k, v in examples.items()},
                photos=photos.permute(0, 2, 3, 1))


def faithfulness_figure(result: dict) -> Figure:
    fig = Figure(figsize=(11, 4))
    fraction = np.linspace(0, 1, result["steps"] + 1)
    for ax, kind in zip(fig.subplots(1, 2), ("deletion", "insertion")):
        for name, m in result["maps"].items():
            style = "--" if name in ("random", "centre") else "-"
            ax.plot(fraction, m[f"{kind}_curve"], style, label=f"{name} (AUC {m[f'{kind}_auc']:.3f})")
        ax.set(xlabel=f"fraction of pixels {'deleted' if kind == 'deletion' else 'revealed'}",
               ylabel="probability of the explained class", title=f"{kind} ({result['n']} images; lower "
               f"area is better)" if kind == "deletion" else f"{kind} (higher area is better)", ylim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sanity_figure(photos: torch.Tensor, examples: torch.Tensor, steps: list[str], layer: str) -> Figure:
    """Rows: images; columns: the photo, the trained network's map, then the map after each step of
    the cascade."""
    rows, cols = examples.shape[0], examples.shape[1] + 1
    fig = Figure(figsize=(1.6 * cols, 1.7 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(photos[r].numpy())
        for c in range(1, cols):
            axes[r, c].imshow(examples[r, c - 1].numpy(), cmap="jet", vmin=0, vmax=1)
        for c in range(cols):
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(["photo", "trained"][c] if c < 2 else f"-{steps[c - 2]}", fontsize=8)
    fig.suptitle(f"Grad-CAM at {layer}, weights re-initialised cumulatively from the head down", fontsize=9)
    fig.tight_layout()
    return fig


def _rho(step: dict) -> str:
    text = f"{step['spearman']:.3f}" if math.isfinite(step["spearman"]) else "—"
    return text + (f" ({step['constant_maps']} flat)" if step["constant_maps"] else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def studies_markdown(name: str, faith: dict | None, sanity: dict | None) -> str:
    lines = [f"# Does Grad-CAM explain {name}?\n"]
    if faith:
        lines += [f"Deletion and insertion (Petsiuk et al. 2018) over {_count(faith['n'], 'image')}, "
                  f"{faith['steps']} steps, baseline: {faith['baseline']}.\n",
                  "| map | deletion AUC (lower is better) | insertion AUC (higher is better) |", "|---|---|---|"]
        lines += [f"| {k} | {m['deletion_auc']:.4f} | {m['insertion_auc']:.4f} |" for k, m in faith["maps"].items()]
    if sanity:
        steps = [s["randomised"] for s in next(iter(sanity["layers"].values()))]
        lines += ["", f"Cascading randomisation (Adebayo et al. 2018) over {_count(sanity['n'], 'image')}: "
                  "Spearman rank correlation with the trained network's maps, weights re-initialised from the head "
                  "down.\n",
                  "| layer | " + " | ".join(f"-{s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        lines += [f"| {layer} | " + " | ".join(map(_rho, rows)) + " |" for layer, rows in sanity["layers"].items()]
        if any(s["constant_maps"] for rows in sanity["layers"].values() for s in rows):
            lines += ["", "(k flat): k of the images had a map of one value (Grad-CAM's ReLU zeroes a map whose "
                      "gradients all point against the class), which ranks nothing: the mean is over the others, "
                      "and — where every map was flat."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    d = DEFAULTS
    p = Parser(__doc__, __file__)
    p.add_argument("images", nargs="*", help="image files (or folders of them) to explain")
    p.add_argument("--checkpoint", required=True, help="a classifier best.pt or a run directory holding one (with "
                   "--faithfulness or --sanity also a --fold all run directory: every fold on its own split)")
    p.add_argument("--fold", type=int, default=d["fold"], choices=FOLDS,
                   help="explain this fold's --split instead of files (default: the checkpoint's fold); with "
                   "a --fold all run, that fold's network alone")
    p.add_argument("--split", default=d["split"], choices=["Train", "Valid", "Test"])
    p.add_argument("--data-root", default=None, help="default: the dataset the checkpoint trained on")
    p.add_argument("--limit", type=Number(int, 1), default=d["limit"],
                   help=f"at most this many images: of the split, taken from each class in turn (default: "
                        f"{SPLIT_LIMIT}), or of those given, in their order (default: all)")
    p.add_argument("--layer", action="append", default=d["layer"], help="target module, e.g. layer3 or "
                   "backbone.layer3 (default: the model's); repeat it to compare layers with --faithfulness/--sanity "
                   "(default there: every layer offered, for a ResNet layer2, layer3 and layer4)")
    p.add_argument("--faithfulness", action="store_true", help="deletion and insertion curves (Petsiuk et al. 2018) "
                   "of Grad-CAM and two baselines, instead of overlays")
    p.add_argument("--sanity", action="store_true", help="cascading randomisation (Adebayo et al. 2018): how "
                   "Grad-CAM's maps change as the weights are re-initialised, instead of overlays")
    p.add_argument("--target-class", default=d["target_class"], help="explain this class instead of the predicted one")
    p.add_argument("--alpha", type=Number(float, 0, 1), default=d["alpha"], help="heat-map opacity")
    p.add_argument("--cmap", default=d["cmap"], help="matplotlib colormap")
    p.add_argument("--ood-score", default=d["ood_score"], choices=SCORES,
                   help="frame in red the photos beyond this out-of-distribution score's threshold (default: the "
                   "checkpoint's)")
    p.add_argument("--out", default=d["out"], help="output folder (default RUN/gradcam)")
    p.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=d["precision"], choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--memory-format", default=d["memory_format"], choices=MEMORY_FORMATS)
    p.add_argument("--batch-size", type=Number(int, 1), default=d["batch_size"])
    return p.parse_args(argv)


def _image_paths(args, ckpt) -> list[Path]:
    """The images given (files, or folders of them), else the --split of --fold (default: the
    checkpoint's own fold), at most --limit of them."""
    if args.images:  # it was ignored without a word
        refuse_unused(args, DEFAULTS, ["split"], "picks a fold's photos, and photos are given; leave one out")
    if args.images:  # each image once, however often it was named (a file, and the folder holding it)
        paths = each_once(q for p in map(Path, args.images) for q in (images_in([p]) if p.is_dir() else [p]))
        if args.limit and len(paths) > args.limit:  # asked for: it was ignored, and a folder took minutes
            print(f"note: the first {args.limit} of the {len(paths)} images given (--limit)")
        return paths[:args.limit]
    fold = args.fold or ckpt.get("fold")
    if fold is None:
        raise DataError("give image files, or --fold K to explain a fold's split")
    root = usable_folds_root(args.data_root or ckpt["config"].get("data_root") or "data")
    pairs = index_split(root, fold, args.split)  # every class's photos, also those of a class it was trained without
    paths = spread_over_classes(pairs, args.limit or SPLIT_LIMIT)
    if seen := photos_seen(ckpt, root, ckpt["classes"], paths):
        print(f"note: {seen} of these {len(paths)} photos of fold {fold}'s {args.split} split are photos the network "
              f"learned from (fold {ckpt['fold']}): maps of them say little about photos it has not seen")
    return paths


def spread_over_classes(pairs, limit: int) -> list[Path]:
    """At most `limit` of the (path, label) pairs, taken from each class in turn (a class's first
    photo, then its second, ...), in their listed order: the first 24 in file order were fold 1's
    Chickenpox, Cowpox and HFMD photos, with no Mpox photo among them."""
    place, seen = [], collections.Counter()  # each photo's place in its class: 0 for every class's first, ...
    for _, label in pairs:
        place.append(seen[label])
        seen[label] += 1
    chosen = sorted(range(len(pairs)), key=lambda i: (place[i], pairs[i][1]))[:limit]
    return [pairs[i][0] for i in sorted(chosen)]


def load_images(paths, input_size: int) -> list:
    """The photos, decoded no larger than the network's input and the overlay need: a folder of
    phone photos (12 megapixels, 36 MB each decoded) held whole took gigabytes."""
    return [load_image(p, shrink_to=resize_size(max(input_size, DISPLAY_SIZE))) for p in paths]


def networks(args) -> dict:
    """--checkpoint's networks, {None: path} or {fold: path} for a --fold all run: with --fold K,
    fold K's alone (explaining its own fold's split, never one it trained on)."""
    runs = find_checkpoints(args.checkpoint)
    if args.fold and None not in runs:
        if args.fold not in runs:
            raise DataError(f"--fold {args.fold}: no best.pt for it in {args.checkpoint}")
        runs = {args.fold: runs[args.fold]}
    return runs


def run_studies(args, rt) -> dict:
    """--faithfulness and --sanity for one checkpoint, or for every fold of a --fold all run (each on
    its own fold's --split, unless images are given; --fold K: fold K's alone), with a summary over
    the folds."""
    runs, results = networks(args), {}
    root = output_folder(args.out or (runs[None].parent if None in runs else Path(args.checkpoint)) / "gradcam",
                         "gradcam", OUTPUTS)
    with atomic_path(root, folder=True) as folder:  # root's earlier outputs go whole, once these are all written
        for fold, path in runs.items():
            model, ckpt = load_classifier(path, rt)
            layers = [GradCAM(model, layer).layer_name for layer in (args.layer or model.cam_candidates)]
            images = load_images(_image_paths(args, ckpt), model.input_size)
            faith = faithfulness(model, images, rt, layers, args.batch_size) if args.faithfulness else None
            sanity = randomisation(model, images, rt, layers, args.batch_size) if args.sanity else None
            write_studies(folder / (f"fold{fold}" if fold else ""),
                          f"{ckpt['model']} fold {ckpt.get('fold')} at {model.input_size} px", faith, sanity)
            results[fold] = dict(faithfulness=faith, sanity=sanity and tables(sanity))
        if len(runs) > 1:
            atomic_write(folder / "summary.md", studies_summary(results))
            print(studies_summary(results))
        save_config(folder, args, rt, root)
    done = " and ".join(s for s, asked in (("faithfulness", args.faithfulness), ("sanity", args.sanity)) if asked)
    print(f"wrote the {done} results to {root}/")
    return results


def write_studies(out: Path, name: str, faith: dict | None, sanity: dict | None) -> None:
    if faith:
        atomic_write(out / "faithfulness.json", to_json(faith, indent=2))
        save_figure(faithfulness_figure(faith), out / "faithfulness.png")
    if sanity:
        atomic_write(out / "sanity.json", to_json(tables(sanity), indent=2))
        steps = [s["randomised"] for s in next(iter(sanity["layers"].values()))]
        for layer, examples in sanity["examples"].items():
            save_figure(sanity_figure(sanity["photos"], examples, steps, layer), out / f"sanity_{layer}.png")
    text = studies_markdown(name, faith, sanity)
    atomic_write(out / "explains.md", text)
    print(text)


def tables(sanity: dict) -> dict:
    """The numbers of a randomisation result, without its example maps and photos."""
    return {k: v for k, v in sanity.items() if k not in ("examples", "photos")}


def studies_summary(results: dict) -> str:
    """Mean ± std over folds: each map's deletion and insertion areas; each layer's Spearman
    correlation once every weight is re-initialised."""
    folds = list(results.values())
    lines = [f"# Does Grad-CAM explain? {len(folds)} folds, mean ± std\n"]
    if folds[0]["faithfulness"]:
        lines += ["| map | deletion AUC (lower is better) | insertion AUC (higher is better) |", "|---|---|---|"]
        for name in folds[0]["faithfulness"]["maps"]:
            lines.append(f"| {name} | {mean_std([f['faithfulness']['maps'][name]['deletion_auc'] for f in folds])} | "
                         f"{mean_std([f['faithfulness']['maps'][name]['insertion_auc'] for f in folds])} |")
    if folds[0]["sanity"]:
        lines += ["", "| layer | Spearman, all weights re-initialised |", "|---|---|"]
        for layer in folds[0]["sanity"]["layers"]:
            lines.append(f"| {layer} | {mean_std([f['sanity']['layers'][layer][-1]['spearman'] for f in folds])} |")
    return "\n".join(lines) + "\n"


def save_config(folder: Path, args, rt: Runtime, out: Path) -> None:
    """The command's resolved arguments beside its outputs (written in `folder`, which becomes `out`), so
    a figure can be traced to what made it."""
    atomic_write(folder / "config.json", to_json(dict(vars(args), out=str(out), runtime=rt.describe()), indent=2))


def run(args) -> list:
    rt = select_runtime(args.device, args.precision, args.memory_format)
    if args.faithfulness or args.sanity:
        refuse_unused(args, DEFAULTS, ["target_class", "alpha", "cmap", "ood_score"], "shapes the overlays, which "
                      "--faithfulness and --sanity do not draw (they explain each photo's predicted class); omit it")
        return run_studies(args, rt)
    runs = networks(args)
    if len(runs) > 1:
        raise DataError(f"{args.checkpoint}: a --fold all run, and overlays are drawn by one network: choose it with "
                        f"--fold K, or give one fold's, e.g. --checkpoint {runs[min(runs)].parent}")
    checkpoint = next(iter(runs.values()))
    model, ckpt = load_classifier(checkpoint, rt)
    classes = ckpt["classes"]
    if args.target_class is not None and args.target_class not in classes:
        raise DataError(f"--target-class {args.target_class}: not one of {', '.join(classes)}")
    target = None if args.target_class is None else classes.index(args.target_class)
    if args.cmap not in matplotlib.colormaps:
        raise DataError(f"--cmap {args.cmap}: not a matplotlib colormap")
    if args.layer and len(args.layer) > 1:
        raise DataError("--layer: overlays are drawn for one layer; give several with --faithfulness or --sanity")
    layer = GradCAM(model, args.layer[0] if args.layer else None).layer_name  # a bad --layer fails before any work
    out = output_folder(args.out or checkpoint.parent / "gradcam", "gradcam", OUTPUTS)  # and an --out in the way
    paths = _image_paths(args, ckpt)
    check_images(paths)  # every file read once first: a bad one stops the run before any output
    reference = gate_by(reference_for(ckpt, model, rt, checkpoint), args.ood_score)
    explain = functools.partial(run_gradcam, model, rt=rt, target=target, layer=layer, alpha=args.alpha,
                                cmap=args.cmap, batch_size=args.batch_size, reference=reference,
                                temperature=ckpt.get("temperature") or 1.0)
    with atomic_path(out, folder=True) as folder:  # out's earlier overlays go whole, once these are all written
        results = write_overlays(explain, paths, model.input_size, args.batch_size, classes, folder, target)
        write_grid(results, [str(p) for p in paths], classes, folder)
        save_config(folder, args, rt, out)
    for e, p in zip(results, paths):
        print(f"{p}: {_caption(e, classes)}")
    first = f" (the first {GRID_MAX})" if len(results) > GRID_MAX else ""
    print(f"wrote {_count(len(results), 'overlay')} and grid.png{first} to {out}/")
    return results


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
