"""Grad-CAM (Selvaraju et al. 2017) by hand, with hooks, for every model of models/.

    python gradcam.py --checkpoint runs/lenet-fold1/best.pt photo1.jpg photo2.jpg
    python gradcam.py --checkpoint runs/lenet-fold1/best.pt --fold 1 --split Test --limit 24
    python gradcam.py --checkpoint runs/x/best.pt --target-class Monkeypox --layer backbone.layer3 photo.jpg

Per image: a PNG with the photo, the heat-map overlay and the predicted class with its probability;
plus grid.png for the whole set. Written to runs/NAME/gradcam/ (or --out). The photos are only read.
"""
import io
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from getData import (FOLDS, DataError, Number, Parser, index_split, list_classes, load_image, prepare, run_main,
                     usable_folds_root)
from models import (MEMORY_FORMATS, PRECISIONS, ModelError, crop, load_classifier, resize_size, save_figure,
                    select_runtime, to_input)

DEFAULTS = dict(checkpoint=None, out=None, fold=None, split="Test", limit=24, layer=None, target_class=None,
                alpha=0.45, cmap="jet", device="auto", precision="auto", memory_format="auto", batch_size=16)
DISPLAY_SIZE = 224  # overlays are drawn at least this large, also for LeNet's 32x32 input


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
        self.layer_name = layer or default
        self.layout = layout or (getattr(model, "cam_layout", "nchw") if layer in (None, default) else "nchw")
        try:
            self.layer = model.get_submodule(self.layer_name)
        except AttributeError:
            names = ", ".join(n for n, _ in model.named_children())
            raise ModelError(f"--layer {self.layer_name}: no such module in {type(model).__name__} "
                             f"(top-level modules: {names})") from None
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


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """uint8 RGB (H, W, 3) + CAM (h, w) in [0, 1] -> uint8 RGB blend at the image's size."""
    cam_t = torch.as_tensor(cam, dtype=torch.float32)[None, None]
    cam = F.interpolate(cam_t, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
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


def run_gradcam(model, images, rt, target=None, layer=None, alpha=0.45, cmap="jet", batch_size=16):
    """PIL images -> list of (probabilities, overlay uint8 array, display crop)."""
    results, size = [], model.input_size
    with GradCAM(model, layer) as cam:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = to_input(torch.stack([prepare(im, resize_size(size)) for im in chunk]), size).to(rt.device)
            tgt = None if target is None else torch.full((len(chunk),), target, dtype=torch.long)
            maps, probs = cam(x, tgt, rt)
            shown = [display_crop(im, size) for im in chunk]
            results += [(p.cpu().numpy(), overlay(s, m.cpu().numpy(), alpha, cmap), s)
                        for p, m, s in zip(probs, maps, shown)]
    return results


def _figure(shown, over, probs, classes, target, title) -> Figure:
    pred = int(np.argmax(probs))
    fig = Figure(figsize=(7, 3.8))
    axes = fig.subplots(1, 2)
    axes[0].imshow(shown)
    axes[0].set_title(title, fontsize=8)
    axes[1].imshow(over)
    explained = f"; map for {classes[target]}" if target is not None and target != pred else ""
    axes[1].set_title(f"{classes[pred]} {probs[pred]:.2f}{explained}", fontsize=10)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def write_figures(results, names, classes, out: Path, target=None) -> None:
    for (probs, over, shown), name in zip(results, names):
        fig = _figure(shown, over, probs, classes, target, Path(name).name)
        save_figure(fig, out / f"{Path(name).stem}_gradcam.png")
    cols = min(6, len(results))
    rows = -(-len(results) // cols)
    fig = Figure(figsize=(2.2 * cols, 2.7 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (probs, over, _), name in zip(axes.flat, results, names):
        ax.imshow(over)
        ax.set_title(f"{classes[int(np.argmax(probs))]} {probs.max():.2f}\n{Path(name).name}", fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "grid.png")


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    d = DEFAULTS
    p = Parser(__doc__, __file__)
    p.add_argument("images", nargs="*", help="image files to explain")
    p.add_argument("--checkpoint", required=True, help="a classifier best.pt")
    p.add_argument("--fold", type=int, default=d["fold"], choices=FOLDS,
                   help="explain this fold's --split instead of files")
    p.add_argument("--split", default=d["split"], choices=["Train", "Valid", "Test"])
    p.add_argument("--data-root", default=None, help="default: the dataset the checkpoint trained on")
    p.add_argument("--limit", type=Number(int, 1), default=d["limit"], help="at most this many images of the split")
    p.add_argument("--layer", default=d["layer"], help="target module, e.g. backbone.layer3 (default: the model's)")
    p.add_argument("--target-class", default=d["target_class"], help="explain this class instead of the predicted one")
    p.add_argument("--alpha", type=Number(float, 0, 1), default=d["alpha"], help="heat-map opacity")
    p.add_argument("--cmap", default=d["cmap"], help="matplotlib colormap")
    p.add_argument("--out", default=d["out"], help="output folder (default RUN/gradcam)")
    p.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=d["precision"], choices=PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--memory-format", default=d["memory_format"], choices=MEMORY_FORMATS)
    p.add_argument("--batch-size", type=Number(int, 1), default=d["batch_size"])
    return p.parse_args(argv)


def _image_paths(args, ckpt) -> list[Path]:
    if args.images:
        return [Path(p) for p in args.images]
    if args.fold is None:
        raise DataError("give image files, or --fold K to explain a fold's split")
    root = usable_folds_root(args.data_root or ckpt["config"].get("data_root") or "data")
    return [p for p, _ in index_split(root, args.fold, args.split, list_classes(root))][: args.limit]


def run(args) -> list:
    rt = select_runtime(args.device, args.precision, args.memory_format)
    model, ckpt = load_classifier(args.checkpoint, rt)
    classes = ckpt["classes"]
    if args.target_class is not None and args.target_class not in classes:
        raise DataError(f"--target-class {args.target_class}: not one of {', '.join(classes)}")
    target = None if args.target_class is None else classes.index(args.target_class)
    if args.cmap not in matplotlib.colormaps:
        raise DataError(f"--cmap {args.cmap}: not a matplotlib colormap")
    paths = _image_paths(args, ckpt)
    images = [load_image(p) for p in paths]  # every file checked before anything is written
    GradCAM(model, args.layer)  # a bad --layer fails here, before any work
    results = run_gradcam(model, images, rt, target, args.layer, args.alpha, args.cmap, args.batch_size)
    out = Path(args.out or Path(args.checkpoint).parent / "gradcam")
    write_figures(results, [str(p) for p in paths], classes, out, target)
    for (probs, _, _), p in zip(results, paths):
        print(f"{p}: {classes[int(np.argmax(probs))]} {probs.max():.3f}")
    print(f"wrote {len(results)} overlays and grid.png to {out}/")
    return results


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
