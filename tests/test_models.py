import urllib.error

import pytest
import torch
import torchvision

from models import MODEL_NAMES, ModelError, build_model, checkpoint_dict, load_checkpoint, load_classifier, save_checkpoint

REQUIRED = ["lenet", "resnext101_64x4d", "resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16",
            "swin_t"]


@pytest.mark.parametrize("name", REQUIRED)
def test_every_model_builds_and_trains_at_its_input_size(name):
    torch.manual_seed(0)
    model = build_model(name, 6)
    x = torch.randn(2, 3, model.input_size, model.input_size)
    logits = model(x)
    assert logits.shape == (2, 6)
    logits.sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert model.features(x).shape == (2, model.num_features)
    assert model.get_submodule(model.cam_layer) is not None and model.cam_layout in ("nchw", "nhwc", "tokens")


def test_model_names_cover_torchvision():
    assert set(REQUIRED) <= set(MODEL_NAMES) and "googlenet" not in MODEL_NAMES


def _ckpt(model, kind="classifier", classes=("a", "b", "c", "d", "e", "f")):
    return checkpoint_dict(model, kind, list(classes), {"fold": 1}, 3, {"valid_acc": 0.5})


def test_init_from_classifier_checkpoint_restores_weights_exactly(tmp_path):
    torch.manual_seed(1)
    trained = build_model("resnet18", 6)
    save_checkpoint(_ckpt(trained), tmp_path / "best.pt")
    torch.manual_seed(2)
    restored = build_model("resnet18", 6, init=str(tmp_path / "best.pt"))
    for (k, a), b in zip(trained.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), k


def test_init_from_encoder_and_other_head(tmp_path):
    torch.manual_seed(1)
    src = build_model("lenet", 4)
    save_checkpoint(_ckpt(src, "encoder"), tmp_path / "encoder.pt")
    save_checkpoint(_ckpt(src, classes="abcd"), tmp_path / "four.pt")
    for path in ("encoder.pt", "four.pt"):
        torch.manual_seed(3)
        model = build_model("lenet", 6, init=str(tmp_path / path))
        assert all(torch.equal(a, b) for a, b in zip(src.backbone.state_dict().values(),
                                                     model.backbone.state_dict().values()))
        assert model.head.weight.shape == (6, 84)  # the head is new: the class count differs


def test_init_from_raw_torchvision_state_dict(tmp_path):
    torch.manual_seed(4)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("resnet18", 6, init=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.backbone.conv1.weight, tv.conv1.weight)


def test_bad_models_and_checkpoints_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="unknown or unsupported"):
        build_model("resnet19", 6)
    with pytest.raises(ModelError, match="auxiliary"):
        build_model("inception_v3", 6)
    save_checkpoint(_ckpt(build_model("lenet", 6)), tmp_path / "lenet.pt")
    with pytest.raises(ModelError, match="checkpoint is for lenet, not resnet18"):
        build_model("resnet18", 6, init=str(tmp_path / "lenet.pt"))
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(ModelError, match="no such checkpoint"):
        build_model("lenet", 6, init=str(tmp_path / "missing.pt"))

    def offline(*a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ModelError, match="could not download ImageNet weights for resnet18"):
        build_model("resnet18", 6, init="imagenet")


def test_encoder_is_not_a_classifier(tmp_path):
    save_checkpoint(_ckpt(build_model("lenet", 6), "encoder"), tmp_path / "encoder.pt")
    with pytest.raises(ModelError, match="SimCLR encoder"):
        load_classifier(tmp_path / "encoder.pt")


def test_checkpoint_is_weights_only_and_written_atomically(tmp_path, monkeypatch):
    model = build_model("lenet", 6)
    save_checkpoint(_ckpt(model), tmp_path / "best.pt")
    before = (tmp_path / "best.pt").read_bytes()
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert {"model", "kind", "state_dict", "classes", "input_size", "fold", "epoch", "metric", "config"} <= set(ckpt)

    def crash(obj, f):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_ckpt(model), tmp_path / "best.pt")
    assert (tmp_path / "best.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
