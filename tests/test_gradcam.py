import gc
import hashlib
import json
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import gradcam
from conftest import assert_one_line_error, drawn, run_cli, strict_json
from getData import index_split, list_classes, load_image, to_json
from gradcam import STEPS, GradCAM, baseline_maps, blurred, curve_area, deletion_insertion, overlay_png, spearman
from models import build_model, checkpoint_dict, load_classifier, save_checkpoint, select_runtime


class QuadrantNet(nn.Module):
    """Known answer: 'feat' is the image itself and the logit of class c is the mean of channel c."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(3).view(3, 3, 1, 1))

    def forward(self, x):
        return self.feat(x).mean((2, 3))


def _quadrant_image():
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, :16, :16] = 1  # class 0's channel lights up top-left only
    x[0, 1, 16:, 16:] = 1  # class 1's: bottom-right
    x[0, 2, :16, 16:] = 1  # class 2's: top-right
    return x


@pytest.mark.parametrize("cls,rows,cols", [(0, slice(0, 16), slice(0, 16)), (1, slice(16, 32), slice(16, 32)),
                                           (2, slice(0, 16), slice(16, 32))])
def test_cam_peaks_where_the_answer_is(cls, rows, cols):
    with GradCAM(QuadrantNet(), layer="feat") as cam:
        maps, probs = cam(_quadrant_image(), torch.tensor([cls]))
    inside = maps[0, rows, cols]
    outside_mask = torch.ones(32, 32, dtype=torch.bool)
    outside_mask[rows, cols] = False
    assert inside[2:-2, 2:-2].min() > 0.9 and maps[0][outside_mask].mean() < 0.2
    assert probs.shape == (1, 3)


def test_hooks_removed_and_nothing_kept_after_many_runs():
    model = build_model("resnet18", 6)
    layer = model.get_submodule(model.cam_layer)
    x = torch.randn(2, 3, 64, 64)
    refs = []
    for _ in range(100):
        with GradCAM(model) as cam:
            cam(x)
            refs.append(weakref.ref(cam.activations))
            assert len(layer._forward_hooks) == 1
        assert len(layer._forward_hooks) == 0 and cam.handles == [] and cam.activations is None
    gc.collect()
    assert all(r() is None for r in refs)  # no stored activation outlives its block
    with pytest.raises(ValueError), GradCAM(model) as cam:
        cam(x)
        raise ValueError("boom")  # propagates, and the hooks still go
    assert len(layer._forward_hooks) == 0


def test_batched_equals_per_image_and_shapes():
    torch.manual_seed(0)
    model = build_model("resnet18", 6)
    model.train()  # GradCAM switches to eval itself and restores the mode afterwards
    x = torch.randn(4, 3, 64, 64)
    with GradCAM(model) as cam:
        batch, probs = cam(x)
        single = torch.cat([cam(x[i:i + 1], probs[i:i + 1].argmax(1))[0] for i in range(4)])
    assert model.training
    assert batch.shape == (4, 64, 64) and torch.allclose(batch, single, atol=1e-5)
    assert batch.min() >= 0 and torch.allclose(batch.amax((1, 2)), torch.ones(4))
    assert torch.allclose(probs.sum(1), torch.ones(4))


def reference_cam(model, x, target):
    """Grad-CAM computed another way: the layer's output is swapped for a leaf tensor, whose gradient
    autograd returns directly; no tensor hooks, no stored state."""
    leaf = {}

    def swap(module, inputs, output):
        leaf["a"] = output.detach().requires_grad_(True)
        return leaf["a"]
    handle = model.get_submodule(model.cam_layer).register_forward_hook(swap)
    try:
        with torch.enable_grad():
            score = model.eval()(x).gather(1, target.view(-1, 1)).sum()
            grad, = torch.autograd.grad(score, leaf["a"])
    finally:
        handle.remove()
    a, g = leaf["a"].detach(), grad
    if model.cam_layout == "nhwc":
        a, g = a.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    elif model.cam_layout == "tokens":
        side = int((a.shape[1] - 1) ** 0.5)
        a, g = (t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, side, side) for t in (a, g))
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-8)


@pytest.mark.parametrize("name", ["lenet", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t"])
def test_every_family_matches_the_reference_even_under_no_grad(name):
    torch.manual_seed(0)
    model = build_model(name, 6)
    x = torch.randn(2, 3, model.input_size, model.input_size)
    with torch.no_grad():  # an untrained net: BatchNorm statistics of one batch (at init they zero
        for m in model.modules():  # EfficientNet's activations), and some positive evidence to map
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
        model.train()(torch.randn(8, 3, model.input_size, model.input_size))
        model.eval().head.weight.abs_()
    target = torch.tensor([1, 4])
    ref = reference_cam(model, x, target)
    assert (ref.amax((1, 2)) > 0.5).all()  # neither map is all zeros
    with torch.no_grad(), GradCAM(model) as cam:
        maps, _ = cam(x, target)
    assert maps.shape == (2, model.input_size, model.input_size)
    assert torch.allclose(maps, ref, atol=1e-4) and maps.amax() == pytest.approx(1.0)
    assert all(p.grad is None for p in model.parameters())  # explaining leaves no gradients behind


def test_two_step_api_explains_a_class_chosen_after_the_forward():
    torch.manual_seed(1)
    model = build_model("resnet18", 6).eval()
    x = torch.randn(3, 3, 64, 64)
    target = torch.tensor([5, 0, 2])
    with GradCAM(model) as cam:
        logits = cam.forward(x, select_runtime("cpu"))
        two_step = cam.maps(logits, target)
        one_step, probs = cam(x, target)
    assert torch.allclose(two_step, one_step, atol=1e-6) and torch.allclose(probs, logits.softmax(1), atol=1e-6)
    assert torch.allclose(two_step, reference_cam(model, x, target), atol=1e-4)


def test_overlay_png_for_serve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown = (torch.rand(224, 224, 3) * 255).to(torch.uint8).numpy()
    png = overlay_png(shown, torch.rand(32, 32).numpy())
    assert png.startswith(b"\x89PNG") and Image.open(__import__("io").BytesIO(png)).size == (224, 224)
    assert list(tmp_path.iterdir()) == []  # no files written


@pytest.mark.figures
def test_cli_draws_an_overlay_per_photo_and_a_grid(trained, synthetic, tmp_path):
    photos = sorted((synthetic / "fold1" / "Test" / "Monkeypox").iterdir())[:2]
    before = [hashlib.sha1(p.read_bytes()).hexdigest() for p in photos]
    proc = run_cli("gradcam.py", "--checkpoint", trained / "best.pt", *photos, "--out", tmp_path / "a",
                      "--target-class", "Cowpox")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "a").iterdir()} == {f"{p.stem}_gradcam.png" for p in photos} | {"grid.png",
                                                                                                "config.json"}
    config = json.loads((tmp_path / "a" / "config.json").read_text())  # what made these figures
    assert config["target_class"] == "Cowpox" and config["images"] == [str(p) for p in photos]
    assert config["out"] == str(tmp_path / "a") and config["runtime"]["device"] == str(select_runtime().device)
    figure = Image.open(tmp_path / "a" / f"{photos[0].stem}_gradcam.png").convert("RGB")
    left, right = (figure.crop(box) for box in ((0, 0, figure.width // 2, figure.height),
                                                (figure.width // 2, 0, figure.width, figure.height)))
    assert (np.asarray(left, float) - np.asarray(right, float)).std() > 5  # the overlay differs from the photo
    assert [hashlib.sha1(p.read_bytes()).hexdigest() for p in photos] == before  # originals untouched
    assert drawn(tmp_path / "a" / "grid.png")


def test_cli_explains_a_folds_split_and_replaces_its_own_earlier_overlays(trained, synthetic, tmp_path):
    photo = min((synthetic / "fold1" / "Test" / "Monkeypox").iterdir())
    proc = run_cli("gradcam.py", "--checkpoint", trained / "best.pt", "--fold", "1", "--split", "Test",
                      "--limit", "6", "--out", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "b").glob("*_gradcam.png"))) == 6
    # into a folder of earlier overlays: they go (the grid and config.json describe these), a user's own file stays
    one = ("gradcam.py", "--checkpoint", trained / "best.pt", photo, "--out", tmp_path / "b")
    (tmp_path / "b" / ".ipynb_checkpoints").mkdir()  # Jupyter's, once a figure was opened there: not the user's
    assert run_cli(*one).returncode == 0
    assert {p.name for p in (tmp_path / "b").iterdir()} == {f"{photo.stem}_gradcam.png", "grid.png", "config.json"}
    (tmp_path / "b" / "thesis.docx").write_bytes(b"mine")
    assert_one_line_error(run_cli(*one), "holds thesis.docx, which this script does not write")
    assert (tmp_path / "b" / "thesis.docx").read_bytes() == b"mine"
    explained = [Path(ln.split(": ")[0]) for ln in proc.stdout.splitlines() if ln.startswith(str(synthetic))]
    assert sorted(p.parent.name for p in explained) == list_classes(synthetic)  # one photo of each class, not 6 of one
    assert "note:" not in proc.stdout  # its own fold's Test: photos it never learned from
    learned = {p.name for p, _ in index_split(synthetic, 1, "Train")}
    shown = gradcam.spread_over_classes(index_split(synthetic, 2, "Valid"), 20)
    proc = run_cli("gradcam.py", "--checkpoint", trained / "best.pt", "--fold", "2", "--split", "Valid",
                   "--limit", "20", "--out", tmp_path / "c")
    assert f"note: {sum(p.name in learned for p in shown)} of these 20 photos" in proc.stdout  # the folds share photos


def test_a_limit_takes_each_class_in_turn():
    pairs = [(Path(f"{c}{i}"), label) for label, (c, n) in enumerate([("a", 5), ("b", 3), ("c", 1)]) for i in range(n)]
    assert gradcam.spread_over_classes(pairs, 6) == [Path(p) for p in ("a0", "a1", "a2", "b0", "b1", "c0")]
    assert gradcam.spread_over_classes(pairs, 3) == [Path(p) for p in ("a0", "b0", "c0")]
    assert gradcam.spread_over_classes(pairs, 100) == [p for p, _ in pairs]


def test_many_large_photos_cost_what_their_overlays_need(trained, synthetic, tmp_path, monkeypatch):
    """Photos were held whole at full size (20 16-megapixel PNGs: 2.1 GB at peak, 0.94 GB now) and
    grid.png took every one (a folder of 2,184 photos: 1320 x 98280 pixels, more than Pillow opens)."""
    big = np.zeros((3000, 2000, 3), np.uint8)
    big[:, :1000] = 200
    Image.fromarray(big).save(tmp_path / "big.png")
    needed = gradcam.resize_size(gradcam.DISPLAY_SIZE)
    image, = gradcam.load_images([tmp_path / "big.png"], 32)
    assert needed <= min(image.size) < 2 * needed  # decoded no larger than the overlay is drawn
    monkeypatch.setattr(gradcam, "GRID_MAX", 4)
    photos = sorted((synthetic / "fold1" / "Test" / "Monkeypox").iterdir())[:5]
    proc = run_cli("gradcam.py", "--checkpoint", trained / "best.pt", *photos, tmp_path / "big.png",
                   "--out", tmp_path / "cam")
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1].startswith("wrote 6 overlays and grid.png (the first "
                                                                              "4) to"), proc.stdout + proc.stderr
    assert len(list((tmp_path / "cam").glob("*_gradcam.png"))) == 6
    four = Image.open(tmp_path / "cam" / "grid.png").size
    run_cli("gradcam.py", "--checkpoint", trained / "best.pt", *photos[:4], "--out", tmp_path / "four")
    assert four == Image.open(tmp_path / "four" / "grid.png").size  # four photos wide, one row


def test_a_folder_is_explained_a_batch_at_a_time_after_every_file_is_read(trained, synthetic, tmp_path, monkeypatch):
    """Every photo of a folder was decoded, explained and drawn before the first overlay was written:
    2,184 photos held 1.8 GB. Now a batch at a time; a photo cut short still stops the run first."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted((synthetic / "fold1" / "Test" / "Monkeypox").iterdir())[:7]:
        shutil.copy(p, folder)
    whole = next(folder.iterdir()).read_bytes()
    (folder / "zz_cut.jpg").write_bytes(whole[:len(whole) // 2])
    args = ["--checkpoint", str(trained / "best.pt"), str(folder), "--batch-size", "2", "--device", "cpu"]
    assert_one_line_error(run_cli("gradcam.py", *args, "--out", tmp_path / "cut"), "zz_cut.jpg", "not a readable image")
    assert not list((tmp_path / "cut").glob("*.png"))  # the last file's fault is found before the first overlay
    (folder / "zz_cut.jpg").unlink()
    decoded, real = [], gradcam.load_images
    monkeypatch.setattr(gradcam, "load_images", lambda paths, size: decoded.append(len(paths)) or real(paths, size))
    monkeypatch.setattr(gradcam, "GRID_MAX", 3)
    results = gradcam.run(gradcam.parse_args([*args, "--out", str(tmp_path / "cam")]))
    assert decoded == [2, 2, 2, 1] and len(list((tmp_path / "cam").glob("*_gradcam.png"))) == 7
    assert all(e.overlay is not None for e in results[:3]) and all(e.overlay is None for e in results[3:])
    assert all(e.probs.shape == (6,) for e in results)  # what is printed of each


@pytest.mark.figures
def test_a_photo_whose_name_is_not_utf8_is_explained_and_titled(trained, synthetic, tmp_path):
    """A name of bytes that are not UTF-8 (a camera's, an old archive's) reached matplotlib's title as
    surrogates: a TypeError traceback, and no overlay for any photo; a name with `$...$` in it was read
    as matplotlib's maths, and one it cannot parse was a traceback too."""
    odd = tmp_path / os.fsdecode(b"HEALTHY_08_\xff1.jpg")
    photo = next((synthetic / "fold1" / "Test" / "Healthy").iterdir())
    shutil.copy(photo, odd)
    shutil.copy(photo, tmp_path / "price$\\frac$.jpg")
    proc = run_cli("gradcam.py", "--checkpoint", trained / "best.pt", odd, tmp_path / "price$\\frac$.jpg", "--out",
                   tmp_path / "cam")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cam" / "price$\\frac$_gradcam.png").is_file()
    assert os.listdir(os.fsencode(tmp_path / "cam")).count(b"HEALTHY_08_\xff1_gradcam.png") == 1  # its own bytes
    assert drawn(tmp_path / "cam" / "grid.png")  # titled with the name
    assert gradcam.shown_name(odd) == "HEALTHY_08_\\xff1.jpg"


def test_an_overlays_titles_stay_inside_its_figure_and_name_the_explained_class():
    """A long photo name ran past both edges of its overlay figure as one line (and a long caption into
    its neighbour's); they now fold in two lines, a name cut short, the caption whole."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    img = np.zeros((224, 224, 3), np.uint8)
    e = gradcam.Explained(np.array([0.1, 0.2, 0.7]), img, img, in_distribution=False)
    name = "IMG_20241201_123456_789_" * 8 + "$x$.jpg"
    fig = gradcam._figure(e, ["Hand-foot-mouth disease", "Chickenpox", "Monkeypox"], 0, name)
    renderer = FigureCanvasAgg(fig).get_renderer()
    titles = [ax.title for ax in fig.axes]
    assert titles[0].get_text().startswith("IMG_20241201_") and titles[0].get_text().count("\n") == 1
    assert titles[1].get_text().replace("\n", " ").endswith("Monkeypox 0.70; map for Hand-foot-mouth disease")
    left, right = (t.get_window_extent(renderer) for t in titles)
    assert all(0 <= b.x0 and b.x1 <= fig.bbox.x1 and b.y1 <= fig.bbox.y1 for b in (left, right))
    assert left.x1 < right.x0  # side by side, not over one another


@pytest.mark.figures
def test_the_grid_frames_in_red_the_photos_the_gate_turns_away(tmp_path):
    grey = np.full((64, 64, 3), 128, np.uint8)
    for gated in (None, True, False):
        results = [gradcam.Explained(np.array([0.2, 0.8]), grey, grey, in_distribution=k) for k in (True, gated)]
        gradcam.write_grid(results, ["a.png", "b.png"], ["x", "y"], tmp_path / str(gated))
        pixels = np.asarray(Image.open(tmp_path / str(gated) / "grid.png").convert("RGB")).astype(int)
        red = (np.abs(pixels - (214, 39, 40)).sum(-1) < 60).sum()  # matplotlib's tab:red
        assert (red > 500) == (gated is False), (gated, red)  # a frame, not a red title alone


def test_the_overlays_probabilities_are_the_calibrated_ones_serve_gives(trained, synthetic, tmp_path):
    """gradcam.py printed the network's raw softmax (Monkeypox 0.68) for a photo that serve.py and
    testing.py, dividing the logits by the checkpoint's temperature, call Monkeypox 0.96."""
    import serve
    paths = sorted(synthetic.glob("fold1/Test/*/*.jpg"))[::4]
    rt = select_runtime("cpu")
    model, ckpt = load_classifier(trained / "best.pt", rt)
    with serve.Predictor(trained / "best.pt", rt) as predictor:
        served = [predictor.submit(load_image(p)).result()["probs"] for p in paths]
    explained = gradcam.run_gradcam(model, [load_image(p) for p in paths], rt, temperature=ckpt["temperature"])
    assert ckpt["temperature"] != pytest.approx(1, abs=0.05)  # else this test could not tell the two apart
    assert all(np.allclose(e.probs, s, atol=1e-6) for e, s in zip(explained, served))
    proc = run_cli("gradcam.py", "--checkpoint", trained, *paths, "--out", tmp_path / "g")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()[:-1]  # "PATH: [OOD: ...; ]CLASS P" a photo, then where they were written
    assert len(lines) == len(paths) and all(line.startswith(f"{p}: ") and line.endswith(
        f" {gradcam._caption(e, ckpt['classes'])}") for line, p, e in zip(lines, paths, explained)), lines


@pytest.mark.figures  # the overlays' pixels tell the photos apart
def test_each_photo_is_explained_once_and_no_overlay_replaces_another(trained, synthetic, tmp_path):
    """A photo named twice (itself, and the folder holding it) is explained once; two photos of one
    name in different folders each keep their overlay; a photo whose name is near a file system's 255
    bytes gets an overlay whose name is within them (`NAME_gradcam.png` was not, nor its temporary)."""
    photos = sorted((synthetic / "fold1" / "Test" / "Monkeypox").iterdir())[:2]
    for folder, photo in zip("ab", photos):
        (tmp_path / folder).mkdir()
        shutil.copy(photo, tmp_path / folder / "x.jpg")
    long = tmp_path / "c" / ("é" * 123 + ".jpg")  # 250 bytes
    long.parent.mkdir()
    shutil.copy(photos[0], long)
    given = [tmp_path / "a", tmp_path / "a" / "x.jpg", tmp_path / "b", long]
    assert gradcam.main(["--checkpoint", str(trained / "best.pt"), *map(str, given), "--out", str(tmp_path / "out"),
                         "--device", "cpu"]) == 0
    overlays = {p.name: Image.open(p).tobytes() for p in (tmp_path / "out").glob("*_gradcam.png")}
    assert sorted(overlays)[:2] == ["x-2_gradcam.png", "x_gradcam.png"] and len(overlays) == 3
    assert sorted(overlays)[2].startswith("é" * 100) and len(os.fsencode(sorted(overlays)[2])) <= 255
    assert overlays["x_gradcam.png"] != overlays["x-2_gradcam.png"]  # a's photo and b's, not one drawn twice


def test_flat_maps_rank_nothing_and_say_so_in_strict_json_and_the_table():
    rho = spearman(torch.ones(2, 4, 4), torch.rand(2, 4, 4))  # a map of one value has no ranking
    assert rho.isnan().all()
    step = dict(randomised="head", **gradcam._agreement(rho))
    assert strict_json(to_json(step))["spearman"] is None
    table = gradcam.studies_markdown("x", None, dict(n=2, layers={"layer4": [step]}))
    assert "| layer4 | — (2 flat) |" in table and "nan" not in table


def test_cli_bad_input_is_one_line(trained, synthetic, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    photo = next(synthetic.rglob("*.jpg"))
    ck = trained / "best.pt"
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", ck, text, "--out", tmp_path / "o"),
                          "notes.jpg", "not a readable image")
    assert not (tmp_path / "o").exists()
    encoder = tmp_path / "encoder.pt"
    save_checkpoint(checkpoint_dict(build_model("lenet", 6), "encoder", list("abcdef"), {}, 1, {}), encoder)
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", encoder, photo), "SimCLR encoder")
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", ck, photo, "--layer", "backbone.layer9"),
                          "no such module")
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", ck, photo, "--target-class", "Flu"), "Flu")


# ----------------------------------------------------------------------------- does the map explain?
class LeftTexture(nn.Module):
    """Known answer: class 1's logit is the fine texture in the left half of the image, class 0's a
    constant. `feat` (a fixed Laplacian, rectified and locally averaged) responds to texture
    anywhere; the head reads only its left half."""
    input_size = 32

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        laplacian = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
        with torch.no_grad():
            conv.weight.copy_(laplacian.expand(1, 3, 3, 3) / 3)
        self.feat = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(3, stride=1, padding=1))

    def forward(self, x):
        texture = self.feat(x)[..., :x.shape[-1] // 2].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(texture), 2 * texture - 2], 1)


def _left_textured(n=6):
    """A fine checkerboard on the left half, flat on the right: the evidence for class 1 is on the left."""
    x = torch.zeros(n, 3, 32, 32)
    board = (torch.arange(32)[:, None] + torch.arange(16)[None]) % 2 * 2.0 - 1
    x[..., :16] = board + 0.1 * torch.randn(n, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    return x


def test_deletion_by_the_map_beats_a_random_map_where_the_answer_is_known():
    model, x = LeftTexture().eval(), _left_textured()
    target = torch.ones(len(x), dtype=torch.long)
    rt, gen = select_runtime("cpu"), torch.Generator().manual_seed(1)
    with GradCAM(model, layer="feat") as cam:
        maps, probs = cam(x, target)
    assert (maps[..., :16].sum((1, 2)) / maps.sum((1, 2)) > 0.95).all()  # the mass on the left half
    curves = {name: deletion_insertion(model, x, target, m, rt, gen)
              for name, m in dict(gradcam=maps, **baseline_maps(len(x), 32, gen)).items()}
    deletion = {name: float(curve_area(d).mean()) for name, (d, _) in curves.items()}
    insertion = {name: float(curve_area(i).mean()) for name, (_, i) in curves.items()}
    assert deletion["gradcam"] < deletion["random"] - 0.2, (deletion, insertion)
    assert insertion["gradcam"] > insertion["random"] + 0.1, insertion
    for d, i in curves.values():  # the curves start (deletion) and end (insertion) at the image's own probability
        assert torch.allclose(d[:, 0], probs[:, 1], atol=1e-5) and torch.allclose(i[:, -1], probs[:, 1], atol=1e-5)
    blurred_image = model(blurred(x)).softmax(1)[:, 1]
    for d, i in curves.values():  # and at the blurred image's at the other end
        assert torch.allclose(d[:, -1], blurred_image, atol=1e-5) and torch.allclose(i[:, 0], blurred_image, atol=1e-5)


def test_curve_areas_are_over_the_fraction_of_pixels_as_sklearn_computes_them():
    from sklearn.metrics import auc
    curves = torch.rand(4, STEPS + 1, generator=torch.Generator().manual_seed(0))
    fraction = np.linspace(0, 1, STEPS + 1)  # 0%, 4%, ... 100% of the pixels deleted or inserted
    assert curve_area(curves).numpy() == pytest.approx([auc(fraction, c) for c in curves.numpy()], abs=1e-6)


def test_spearman_ranks_ties_as_scipy_does():
    from scipy.stats import spearmanr
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 40), generator=g).float()  # many ties, as Grad-CAM's ReLU leaves zeros
    b = a + torch.randint(0, 3, (3, 40), generator=g).float()
    ours = spearman(a, b)
    for i in range(3):
        assert ours[i].item() == pytest.approx(spearmanr(a[i], b[i]).statistic, abs=1e-9)
    assert torch.isnan(spearman(torch.ones(1, 5), a[:1, :5])).all()  # a constant map correlates with nothing


def test_randomising_the_network_drops_the_maps_correlation(trained_resnet, synthetic):
    from gradcam import randomisation
    model, _ = load_classifier(trained_resnet / "best.pt", select_runtime("cpu"))
    images = [load_image(p) for p in sorted(synthetic.glob("fold1/Test/*/*.jpg"))[:12]]
    streams = torch.get_rng_state()
    result = randomisation(model, images, select_runtime("cpu"), ["backbone.layer3"], 12)
    assert torch.equal(torch.get_rng_state(), streams)  # its seeded draws leave the caller's streams alone
    steps = result["layers"]["layer3"]
    assert [s["randomised"] for s in steps] == ["head", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert steps[-1]["spearman"] < 0.3, steps  # measured: 0.36 without the head, -0.09 once every weight is new
    assert result["examples"]["layer3"].shape == (4, 1 + len(steps), 64, 64)
    again = randomisation(model, images, select_runtime("cpu"), ["backbone.layer3"], 12)
    assert again["layers"] == result["layers"]  # seeded: the same new weights every time


@pytest.mark.figures
def test_faithfulness_and_sanity_from_the_command_line(trained, tmp_path):
    proc = run_cli("gradcam.py", "--checkpoint", trained / "best.pt", "--faithfulness", "--sanity", "--limit", 6,
                   "--out", tmp_path / "one")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "one").iterdir()} == {"faithfulness.json", "faithfulness.png", "sanity.json",
                                                              "sanity_relu2.png", "explains.md", "config.json"}
    assert json.loads((tmp_path / "one" / "config.json").read_text())["limit"] == 6
    assert drawn(tmp_path / "one" / "faithfulness.png") and drawn(tmp_path / "one" / "sanity_relu2.png")
    faith = json.loads((tmp_path / "one" / "faithfulness.json").read_text())
    assert faith["n"] == 6 and set(faith["maps"]) == {"gradcam relu2", "random", "centre"}
    assert len(faith["maps"]["random"]["deletion_curve"]) == faith["steps"] + 1
    assert proc.stdout.splitlines()[-1] == f"wrote the faithfulness and sanity results to {tmp_path / 'one'}/"
    assert "%|" not in proc.stderr  # no progress bars where no terminal shows them


def test_faithfulness_of_a_fold_all_run_is_per_fold_and_overlay_flags_are_refused(trained, trained_all, synthetic,
                                                                                  tmp_path):
    proc = run_cli("gradcam.py", "--checkpoint", trained_all, "--faithfulness", "--limit", 3, "--out", tmp_path / "all")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"wrote the faithfulness results to {tmp_path / 'all'}/"  # what was asked
    assert all((tmp_path / "all" / f"fold{k}" / "faithfulness.json").is_file() for k in range(1, 6))
    assert "mean ± std" in (tmp_path / "all" / "summary.md").read_text()
    proc = run_cli("gradcam.py", "--checkpoint", trained_all, "--faithfulness", "--limit", 3, "--fold", 4,
                   "--out", tmp_path / "four")  # one fold's network, on its own fold's split
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (tmp_path / "four").iterdir() if p.is_dir()] == ["fold4"]
    assert json.loads((tmp_path / "four" / "fold4" / "faithfulness.json").read_text())["n"] == 3
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", trained, synthetic / "fold1" / "Test" / "Cowpox",
                                  "--split", "Valid", "--out", tmp_path / "y"), "--split Valid picks a fold's photos")
    for flag, value in (("--target-class", "Cowpox"), ("--cmap", "viridis"), ("--alpha", 0.8)):  # ignored before
        assert_one_line_error(run_cli("gradcam.py", "--checkpoint", trained, "--sanity", flag, value, "--out",
                                      tmp_path / "x"), f"{flag} {value} shapes the overlays, which --faithfulness")


def test_bad_layers_and_empty_image_lists_are_one_line(trained, tmp_path):
    ck = trained / "best.pt"
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", ck, "--faithfulness", "--layer", "layer9"),
                          "--layer", "no such module")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", ck, tmp_path / "empty", "--out", tmp_path / "o"),
                          "no images there")
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", ck, "--layer", "relu1", "--layer", "relu2"),
                          "--layer", "one layer")
    assert not (tmp_path / "o").exists()
