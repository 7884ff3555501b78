import gc
import hashlib
import weakref

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import assert_one_line_error, run_script
from gradcam import GradCAM, explain
from getData import load_image
from models import build_model, checkpoint_dict, load_classifier, save_checkpoint


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


@pytest.mark.parametrize("name", ["lenet", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t"])
def test_every_family_gives_a_map_even_under_no_grad(name):
    model = build_model(name, 6)
    x = torch.randn(2, 3, model.input_size, model.input_size)
    with torch.no_grad(), GradCAM(model) as cam:
        maps, _ = cam(x, torch.tensor([1, 4]))
    assert maps.shape == (2, model.input_size, model.input_size) and torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1  # (an untrained net may have no positive evidence: all 0)
    assert all(p.grad is None for p in model.parameters())  # explaining leaves no gradients behind


def test_explain_for_serve(trained, synthetic, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, ckpt = load_classifier(trained / "best.pt")
    probs, png = explain(model, load_image(next(synthetic.rglob("MKP_*.jpg"))), ckpt["classes"])
    assert probs.shape == (6,) and probs.sum() == pytest.approx(1, abs=1e-5)
    assert png.startswith(b"\x89PNG") and Image.open(__import__("io").BytesIO(png)).size == (224, 224)
    assert list(tmp_path.iterdir()) == []  # no files written


def test_cli_files_and_fold_split(trained, synthetic, tmp_path):
    photos = sorted((synthetic / "fold1" / "Test" / "Monkeypox").iterdir())[:2]
    before = [hashlib.sha1(p.read_bytes()).hexdigest() for p in photos]
    proc = run_script("gradcam.py", "--checkpoint", trained / "best.pt", *photos, "--out", tmp_path / "a",
                      "--target-class", "Cowpox")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "a").iterdir()} == {f"{p.stem}_gradcam.png" for p in photos} | {"grid.png"}
    assert [hashlib.sha1(p.read_bytes()).hexdigest() for p in photos] == before  # originals untouched
    proc = run_script("gradcam.py", "--checkpoint", trained / "best.pt", "--fold", "1", "--split", "Test",
                      "--limit", "5", "--out", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "b").glob("*_gradcam.png"))) == 5


def test_cli_bad_input_is_one_line(trained, synthetic, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    photo = next(synthetic.rglob("*.jpg"))
    ck = trained / "best.pt"
    assert_one_line_error(run_script("gradcam.py", "--checkpoint", ck, text, "--out", tmp_path / "o"),
                          "notes.jpg", "not a readable image")
    assert not (tmp_path / "o").exists()
    encoder = tmp_path / "encoder.pt"
    save_checkpoint(checkpoint_dict(build_model("lenet", 6), "encoder", list("abcdef"), {}, 1, {}), encoder)
    assert_one_line_error(run_script("gradcam.py", "--checkpoint", encoder, photo), "SimCLR encoder")
    assert_one_line_error(run_script("gradcam.py", "--checkpoint", ck, photo, "--layer", "backbone.layer9"),
                          "no such module")
    assert_one_line_error(run_script("gradcam.py", "--checkpoint", ck, photo, "--target-class", "Flu"), "Flu")
