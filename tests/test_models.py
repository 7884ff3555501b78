import io
import random
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models import (EMA, PLAIN_VIEW, TTA_VIEWS, ModelError, backend_for, batch_indices, build_model,
                    checkpoint_dict, crop, epoch_generators, fit_temperature, load_checkpoint, load_classifier,
                    make_optimizer, model_names, param_groups, per_rank_batch, predict, predict_logits, probabilities,
                    save_checkpoint, select_runtime, set_seed, shard, to_input, unwrap, view)

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
    seen = []  # the Grad-CAM layer must give a spatial map (a grid of more than one position)
    handle = model.get_submodule(model.cam_layer).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(x)
    handle.remove()
    shape = seen[0]
    grid = {"nchw": shape[2:], "nhwc": shape[1:3], "tokens": (shape[1] - 1,)}[model.cam_layout]
    assert len(shape) in (3, 4) and torch.Size(grid).numel() > 1, (name, shape)


def test_model_names_cover_torchvision():
    assert set(REQUIRED) <= set(model_names()) and "googlenet" not in model_names()


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
        load_classifier(tmp_path / "encoder.pt", select_runtime("cpu"))


def test_checkpoint_is_weights_only_and_written_atomically(tmp_path, monkeypatch):
    model = build_model("lenet", 6)
    save_checkpoint(_ckpt(model), tmp_path / "best.pt")
    before = (tmp_path / "best.pt").read_bytes()
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert {"model", "kind", "state_dict", "classes", "input_size", "fold", "epoch", "metric", "config"} <= set(ckpt)

    def crash(obj, f):
        f.write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_ckpt(model), tmp_path / "best.pt")
    assert (tmp_path / "best.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_ctrl_c_in_the_middle_of_a_save_stays_a_ctrl_c(tmp_path, monkeypatch):
    """torch's zip writer, closing after an interrupted write, raises a RuntimeError of its own: the
    caller must see the KeyboardInterrupt (a user's Ctrl-C, one line), not that error's traceback."""
    import models.checkpoint
    save_checkpoint(_ckpt(build_model("lenet", 6)), tmp_path / "best.pt")
    before, writes = (tmp_path / "best.pt").read_bytes(), []

    class Interrupted(io.FileIO):
        def write(self, data):
            writes.append(len(data))
            if len(writes) == 3:
                raise KeyboardInterrupt
            return super().write(data)
    monkeypatch.setattr(models.checkpoint, "open", lambda path, mode: Interrupted(path, mode), raising=False)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_ckpt(build_model("lenet", 6)), tmp_path / "best.pt")
    assert len(writes) == 3 and (tmp_path / "best.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_checkpoints_hold_unwrapped_weights_whatever_wraps_the_model():
    model = build_model("lenet", 6)
    wrapped = torch.compile(nn.DataParallel(model))  # DDP and compile wrappers expose .module / ._orig_mod
    assert unwrap(wrapped) is model
    keys = list(checkpoint_dict(wrapped, "classifier", list("abcdef"), {}, 1, {})["state_dict"])
    assert keys == list(model.state_dict()) and not any(k.startswith(("module.", "_orig_mod")) for k in keys)


# ----------------------------------------------------------------------------- optimisation
def test_no_weight_decay_on_norms_and_biases_for_every_optimizer():
    model = build_model("resnet18", 6)
    groups = param_groups(model, 0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    bn = model.backbone.bn1
    assert {id(bn.weight), id(bn.bias), id(model.head.bias)} <= no_decay
    assert id(model.head.weight) not in no_decay and id(model.backbone.conv1.weight) not in no_decay
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name in ("sgd", "adam", "adamw", "adagrad", "lars"):  # a step with zero gradients: only decay moves weights
        net = build_model("lenet", 6)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = make_optimizer(name, param_groups(net, 0.5), lr=0.1)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in net.named_parameters():
            moved = not torch.equal(p, before[n])
            assert moved == (p.ndim > 1), (name, n)
        decay_all = make_optimizer(name, param_groups(net, 0.5, decay_all=True), lr=0.1)
        assert len(decay_all.param_groups) == 1 and decay_all.param_groups[0]["weight_decay"] == 0.5
        assert not opt.param_groups[0].get("fused")  # on a CPU: the arithmetic README's figures came from


def test_ema_follows_its_formula_and_copies_integer_buffers():
    model = nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(3.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model)  # decay ramps up: min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, d * w0 + (1 - d) * 3.0)
    assert ema.module.num_batches_tracked == 7
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((2,), 3.0), atol=1e-6)
    restored = EMA(nn.BatchNorm1d(2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 201 and torch.equal(restored.module.weight, ema.module.weight)


def test_set_seed_repeats_what_python_numpy_and_torch_draw():
    draws = []
    for _ in range(2):
        set_seed(7)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(())), float(torch.randn(()))))
    assert draws[0] == draws[1]
    set_seed(8)
    assert all(a != b for a, b in zip(draws[0], (random.random(), np.random.rand(), torch.rand(()), torch.randn(()))))


# ----------------------------------------------------------------------------- predict
def test_views_crop_where_they_say_and_flip():
    x = torch.arange(5 * 5, dtype=torch.uint8).view(1, 1, 5, 5).expand(1, 3, 5, 5)
    assert crop(x, 3)[0, 0, 0].tolist() == [6, 7, 8]  # centre
    assert crop(x, 3, "top-left")[0, 0, 0, 0] == 0 and crop(x, 3, "bottom-right")[0, 0, -1, -1] == 24
    assert crop(x, 3, "top-right")[0, 0, 0].tolist() == [2, 3, 4] and crop(x, 3, "bottom-left")[0, 0, -1, 0] == 20
    assert torch.equal(view(x, 3, "center", "h"), view(x, 3).flip(-1))
    assert torch.equal(view(x, 3, "center", "hv"), view(x, 3).flip(-1).flip(-2))
    assert len(set(TTA_VIEWS)) == 8 and TTA_VIEWS[0] == PLAIN_VIEW[0]  # eight different views


def test_tta_with_one_view_is_the_plain_prediction():
    torch.manual_seed(0)
    model = build_model("lenet", 6).eval()
    images = torch.randint(0, 256, (10, 3, 37, 37), dtype=torch.uint8)
    rt = select_runtime("cpu")
    plain = model(to_input(images, 32)).softmax(1)
    assert torch.allclose(predict(model, images, rt), plain, atol=1e-6)
    assert torch.allclose(probabilities(predict_logits(model, images, rt, views=TTA_VIEWS[:1])), plain, atol=1e-6)
    assert not torch.allclose(predict(model, images, rt, tta=True), plain, atol=1e-3)  # 8 views do differ


def test_temperature_scaling_lowers_valid_nll_and_keeps_the_argmax():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (300,), generator=g)
    logits = torch.randn(300, 6, generator=g) * 2
    logits[torch.arange(300), y] += 2.0
    logits = 4 * logits  # an over-confident network
    t = fit_temperature(logits[None], y)
    nll = lambda T: F.nll_loss(probabilities(logits[None], T).log(), y).item()  # noqa: E731
    assert t > 1.5 and nll(t) < nll(1.0) - 0.1
    assert nll(t) <= min(nll(t * 0.9), nll(t * 1.1))  # a minimum
    assert torch.equal(probabilities(logits[None], t).argmax(1), logits.argmax(1))


# ----------------------------------------------------------------------------- runtime
def test_runtime_choices_and_errors():
    cpu = select_runtime("cpu")
    assert cpu.device.type == "cpu" and not cpu.bf16 and not cpu.channels_last
    fast = select_runtime("cpu", "bf16", "channels_last")
    model = fast.module(build_model("resnet18", 6, input_size=32))
    out = fast.forward(model, torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.float32 and model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            select_runtime("cuda")
    with pytest.raises(ModelError, match="--precision fp16"):
        select_runtime("cpu", "fp16")


@pytest.mark.parametrize("units", [False, True])
def test_bf16_is_the_default_and_silent_only_where_the_hardware_has_it(monkeypatch, capsys, units):
    """An AVX2 CPU or a pre-Ampere GPU (a T4) emulates bf16, many times slower than fp32: `auto`
    keeps fp32 there and an explicit bf16 gets a note. The probes are faked; nothing runs on CUDA."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: units)
    assert select_runtime("cpu", "bf16").bf16 and ("no bf16 units" in capsys.readouterr().out) != units
    assert select_runtime("cpu", "bf16", quiet=True).bf16 and capsys.readouterr().out == ""  # --jobs' folds
    assert not select_runtime("cpu").bf16  # fp32 on CPU by default, whatever it has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0) if units else (7, 5))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # select_runtime sets these flags
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    gpu = select_runtime("cuda")
    assert gpu.device.type == "cuda" and gpu.bf16 == units and gpu.channels_last
    assert capsys.readouterr().out == ""
    assert select_runtime("cuda", "bf16").bf16 and ("GPU has no bf16 units" in capsys.readouterr().out) != units


def test_every_rank_gets_an_equal_share_of_a_batch():
    class Rt:  # what shard() reads of a Runtime
        def __init__(self, rank, world):
            self.rank, self.world = rank, world
    for batch, world in ((10, 4), (7, 2)):
        per = per_rank_batch(batch, world)
        assert per == batch // world
        idx = next(batch_indices(40, per * world, torch.Generator().manual_seed(0)))
        shares = [shard(idx, Rt(r, world)) for r in range(world)]
        assert all(len(s) == per for s in shares) and len(torch.cat(shares).unique()) == per * world
    with pytest.raises(ModelError, match="at least 8"):
        per_rank_batch(7, 4)


def test_sampler_weights_draw_balanced_classes():
    targets = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    counts = torch.bincount(targets).float()
    weights = (1 / counts)[targets]
    drawn = torch.cat(list(batch_indices(len(targets), 10, torch.Generator().manual_seed(0), weights)))
    many = torch.cat([torch.cat(list(batch_indices(len(targets), 10, torch.Generator().manual_seed(s), weights)))
                      for s in range(300)])
    share = torch.bincount(targets[many], minlength=3) / float(len(many))
    assert len(drawn) == 100 and torch.allclose(share, torch.full((3,), 1 / 3), atol=0.02)
    plain = torch.cat(list(batch_indices(len(targets), 10, torch.Generator().manual_seed(0))))
    assert sorted(plain.tolist()) == list(range(100))  # without weights: a permutation


def test_every_pass_has_its_own_streams_whatever_came_before():
    """The batch order of (seed, epoch) is the same on every rank; augmentation and dropout streams
    differ between ranks and epochs; and none depends on what ran earlier (so resume needs no state)."""
    def draws(key, rank):
        order, views = epoch_generators(key, rank)
        return torch.rand(3, generator=order), torch.rand(3, generator=views), torch.rand(3)  # global: dropout
    torch.rand(100)  # whatever the process drew before
    first = draws((0, 4), 0)
    torch.manual_seed(123)
    again, other_rank, next_epoch = draws((0, 4), 0), draws((0, 4), 1), draws((0, 5), 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(first[0], other_rank[0])  # one batch order for all ranks
    assert not torch.equal(first[1], other_rank[1]) and not torch.equal(first[2], other_rank[2])
    assert not any(torch.equal(a, b) for a, b in zip(first, next_epoch))
