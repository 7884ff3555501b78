"""CUDA correctness checked on a CPU: every script run with its runtime on PyTorch's `meta` device.

A meta tensor has a device, a shape and a dtype but no data, and every operator refuses to mix it
with a CPU tensor, as it refuses to mix a CUDA tensor with a CPU one. So a script that leaves a
model, a cache, a constant or a per-step tensor on the CPU while its runtime says "meta" fails here
exactly where it would fail on a GPU. `HostWatch` also sees every copy between the host and the
device: the first copy back to the host (`.cpu()`, `.item()`, `.tolist()`, `bool(tensor)`,
`nonzero()`) stops the run with `ReachedHost`, which tells where a script first waits for the device.

What this catches: models, caches and constants left on the CPU; a host-to-device copy inside a
training step (counted, also `torch.tensor(..., device=...)`); a device-to-host round trip inside a
step; the number of operators a step launches. What it cannot: wrong numbers (meta computes
none), CUDA-only failures (cuDNN, NCCL, out-of-memory, kernels that differ from the CPU's), races
between streams, and copies made inside C++ operators that dispatch no `aten` copy. tests/test_cuda.py
covers those where a GPU is lent.
"""
import contextlib
import json

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import gradcam
import models.runtime
import serve
import simclr
import testing
import train
from augment import TRIVIAL_TRAIN_OPS, BatchAugment
from conftest import train_args
from getData import load_image, prepare
from models import EMA, Runtime, build_model, make_optimizer, param_groups, resize_size

aten = torch.ops.aten
META = torch.device("meta")
# Operators whose result the host must wait for: reading a value, or a shape that depends on values.
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten._unique2.default, aten.is_nonzero.default, aten.equal.default}


class ReachedHost(Exception):
    """A device result was read on the host: where the script first waits for the device."""


class HostWatch(TorchDispatchMode):
    """Counts the operators run, the host-to-device copies made, and stops at the first read back."""

    def __init__(self):
        super().__init__()
        self.ops, self.kernels, self.copies = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(func)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        devices = [t.device.type for t in tensors]
        self.kernels += "meta" in devices and not func.is_view  # a device operator that is not a view
        if func in HOST_READS and "meta" in devices:
            raise ReachedHost(f"{func} reads a device result on the host")
        if func == aten._to_copy.default:
            target = torch.device(kwargs.get("device") or tensors[0].device).type
            self._copy(devices[0], target, func)
        elif func == aten.copy_.default:
            self._copy(devices[1], devices[0], func)
        return func(*args, **kwargs)

    def _copy(self, source, target, func):
        if source == "meta" and target == "cpu":
            raise ReachedHost(f"{func} copies a device result to the host")
        self.copies += source == "cpu" and target == "meta"


class DataOnDevice(TorchFunctionMode):
    """`torch.tensor(data, device=...)` and `torch.as_tensor` copy from the host without an `aten`
    copy that HostWatch could see: count them too."""

    def __init__(self, watch: HostWatch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type != "cpu":
            self.watch.copies += 1
        return func(*args, **kwargs)


class watching:
    """`with watching() as w:` both modes at once."""

    def __enter__(self):
        self.watch = HostWatch()
        self.data = DataOnDevice(self.watch)
        self.data.__enter__()
        self.watch.__enter__()
        return self.watch

    def __exit__(self, *exc):
        self.watch.__exit__(*exc)
        self.data.__exit__(*exc)
        return False


@pytest.fixture
def on_meta(monkeypatch):
    """Every script's runtime on the meta device, as `--device cuda` would put it on a GPU."""
    def meta_runtime(*args, **kwargs):
        return Runtime(META)
    for module in (models.runtime, testing, gradcam, serve, train):
        if hasattr(module, "select_runtime"):
            monkeypatch.setattr(module, "select_runtime", meta_runtime)
    real = Runtime.autocast  # meta has no autocast: bf16 runtimes (the benchmark's rows) run without it here
    monkeypatch.setattr(Runtime, "autocast", lambda rt: contextlib.nullcontext() if rt.device == META else real(rt))
    return Runtime(META)


def test_the_watch_sees_what_it_must(on_meta):
    """The watch itself can fail: a per-step constant built from host data, an `.to(device)` and a
    read back are all seen (this is how `normalize` and `trivial_pixels` used to work)."""
    x = torch.zeros(2, 3, 4, 4, device=META)
    with watching() as w:
        mean = torch.tensor((0.5, 0.5, 0.5), device=x.device).view(1, 3, 1, 1)
        shift = torch.ones(2).to(x.device)
        (x - mean) * shift.view(2, 1, 1, 1)
    assert w.copies == 2
    with pytest.raises(ReachedHost), watching():
        x.sum().item()
    with pytest.raises(ReachedHost), watching():
        torch.zeros(3, device=META).nonzero()
    with pytest.raises(RuntimeError, match="device"):  # what a model left on the CPU meets
        torch.nn.Linear(4, 2)(torch.zeros(1, 4, device=META))


def test_testing_py_evaluates_on_the_runtime_device(trained, tmp_path, on_meta):
    """Until the first read back of the logits, the whole evaluation (model, cached Test images,
    views) runs on the runtime's device. On the CUDA-broken testing.py the model stayed on the CPU."""
    with pytest.raises(ReachedHost, match="to the host"), watching() as w:
        testing.main(["--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path / "t")])
    assert aten.convolution.default in w.ops


def test_gradcam_py_explains_on_the_runtime_device(trained, synthetic, tmp_path, on_meta):
    photo = next(synthetic.rglob("MKP_*.jpg"))
    with pytest.raises(ReachedHost), watching() as w:
        gradcam.main(["--checkpoint", str(trained / "best.pt"), str(photo), "--out", str(tmp_path / "cam")])
    assert aten.convolution_backward.default in w.ops  # the maps' backward ran before the read back


def test_serve_py_answers_on_the_runtime_device(trained, synthetic, on_meta):
    image = load_image(next(synthetic.rglob("MKP_*.jpg")))
    shown = gradcam.display_crop(image, 32)
    batch = [(prepare(image, resize_size(32)), shown, None), (prepare(image, resize_size(32)), None, None)]
    with serve.Predictor(trained / "best.pt", on_meta) as predictor, pytest.raises(ReachedHost), watching() as w:
        predictor._run(batch)  # one pass with Grad-CAM, as the inference worker runs it
    assert aten.convolution_backward.default in w.ops


@pytest.mark.parametrize("extra", [(), ("--federated", "fedprox", "--clients", 2, "--rounds", 1)],
                         ids=["central", "federated"])
def test_train_py_runs_a_whole_epoch_on_the_runtime_device(synthetic, tmp_path, on_meta, extra):
    """Data, model, EMA, loss weights and every step's tensors on the device: the epoch's steps all
    run before the first read back, the epoch's loss (one wait per epoch, none per step)."""
    central = () if extra else ("--epochs", 1, "--ema", 0.99)  # what a federated run refuses, not using them
    args = train_args(synthetic, tmp_path / "r", "--batch-size", 8, "--clip-grad", 1.0, "--balance", "loss",
                      "--augment", "trivial", "--mixup", 0.2, *central, *extra)
    with pytest.raises(ReachedHost, match="local_scalar_dense|to the host"), watching() as w:
        train.main(args)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    steps = config["train_images"] // 8 if not extra else 1
    assert w.ops.count(aten._foreach_lerp_.Scalar) == (steps if not extra else 0)  # the EMA: one call a step
    assert w.ops.count(aten.convolution_backward.default) >= 2 * steps


def test_simclr_py_runs_a_whole_epoch_on_the_runtime_device(synthetic, tmp_path, on_meta, monkeypatch):
    monkeypatch.setattr(simclr.Monitor, "__call__", lambda self, encoder, rt: 0.0)  # embed: as testing.py's
    with pytest.raises(ReachedHost), watching() as w:
        simclr.main(["--data-root", str(synthetic), "--out", str(tmp_path / "s"), "--epochs", "1", "--batch-size", "16",
                     "--device", "cpu"])
    assert w.ops.count(aten.convolution_backward.default) >= 2 * 4


def test_the_benchmark_runs_on_the_device_without_reading_back(on_meta, monkeypatch, capsys):
    monkeypatch.setattr(train, "BENCHMARK_SECONDS", 0.01)
    with watching():
        rows = train.run(train.parse_args(["--benchmark", "--model", "lenet", "--batch-size", "8", "--ema", "0.99",
                                           "--augment", "trivial", "--cutmix", "1.0"]))
    assert len(rows) == 4 and all(r["flops"] > 0 for r in rows)


# ----------------------------------------------------------------------------- a training step's cost
# Device operators per step, views not counted (a view launches no kernel); measured on meta, where
# AdamW and gradient clipping take PyTorch's per-parameter path (on CUDA they pick their `foreach`
# path, a few launches per parameter group): an upper bound of a CUDA step's launches. (The step
# before these tests could not run on meta: TrivialAugment read its indices back from the device;
# its EMA alone was 366 operators for ResNet-18, 1,878 for ResNeXt101.)
STEP_KERNELS = 880  # measured: at most 856
INPUT_KERNELS = 75  # measured: 43 to 68, by which TrivialAugment ops and mix were drawn


def _recipe_step(model_name="resnet18", size=32):
    """The recipe's step (TrivialAugment, MixUp + CutMix, label smoothing, clipping, EMA, warm-up +
    cosine) on the meta device, with a meta uint8 cache."""
    rt = Runtime(META)
    model = rt.module(build_model(model_name, 6, input_size=size))
    opt = make_optimizer("adamw", param_groups(model, 0.05), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = train.Step(model, opt, sched, torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                      BatchAugment(size, TRIVIAL_TRAIN_OPS), mixup=0.2, cutmix=1.0, clip_grad=1.0,
                      ema=EMA(model, 0.998))
    side = resize_size(size)
    cache = torch.zeros(64, 3, side, side, dtype=torch.uint8, device=META)
    targets = torch.zeros(64, dtype=torch.long, device=META)
    total, gen = torch.zeros(3, dtype=torch.float64, device=META), torch.Generator().manual_seed(0)

    def inputs():
        return train.step_inputs(step, cache, targets, 6, torch.randperm(64, generator=gen)[:16], gen)

    def one():
        train.optimise(step, *inputs(), rt, total)
    return one, inputs, step


def test_a_training_step_makes_one_copy_and_never_waits():
    """Per step of the recipe: one host-to-device copy (indices and every random draw together), no
    read back, and a bounded number of device operators. Several steps, so that MixUp and CutMix and
    varied TrivialAugment picks are all seen."""
    one, inputs, _ = _recipe_step()
    one()  # the first step makes the cached constants and the optimizer's state
    for _ in range(8):
        with watching() as w:
            one()
        assert w.copies == 1
        assert w.kernels <= STEP_KERNELS, w.kernels
    for _ in range(20):
        with watching() as w:
            inputs()
        assert w.copies == 1 and w.kernels <= INPUT_KERNELS, w.kernels


def test_the_weight_average_is_two_calls_whatever_the_network():
    one, _, step = _recipe_step()
    one()
    with watching() as w:
        step.ema.update(step.net)
    assert w.kernels <= 2 and aten._foreach_lerp_.Scalar in w.ops
