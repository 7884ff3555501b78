"""The CUDA paths, on a machine with a GPU (the `cuda` marker skips them elsewhere): every script
end to end, the batched augmentation, checkpoints across devices, exact resume with deterministic
kernels, NCCL, CUDA graphs with an EMA, folds side by side, the benchmark. What a CPU can check of
the same paths (placement, copies, waits) is in test_device.py."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from augment import SIMCLR_OPS, TRAIN_OPS, TRIVIAL_TRAIN_OPS, BatchAugment
from conftest import REPO, killed_on_call, run_cli, train_args
from getData import load_image
from models import build_model, load_classifier, make_optimizer, param_groups, predict, select_runtime
from testing import evaluate

pytestmark = pytest.mark.cuda


def cuda_args(data, out, *extra):
    return [a if a != "cpu" else "cuda" for a in train_args(data, out, *extra)]


def test_every_script_runs_end_to_end_on_cuda(synthetic, tmp_path):
    assert run_cli("simclr.py", "--data-root", synthetic, "--epochs", 2, "--device", "cuda",
                   "--out", tmp_path / "simclr").returncode == 0
    assert train.main(cuda_args(synthetic, tmp_path / "r", "--epochs", 3, "--init",
                                tmp_path / "simclr" / "encoder.pt")) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["precision"] == "auto" and config["device"] == "cuda"
    m = evaluate(tmp_path / "r", rt=select_runtime("cuda"), tta=True, resamples=50)["softmax"].metrics
    assert 0 <= m["accuracy"] <= 1 and m["n"] > 0
    assert run_cli("gradcam.py", "--checkpoint", tmp_path / "r" / "best.pt", "--fold", 1, "--limit", 4,
                   "--device", "cuda", "--out", tmp_path / "cam").returncode == 0
    assert len(list((tmp_path / "cam").glob("*_gradcam.png"))) == 4
    import serve
    with serve.Predictor(tmp_path / "r" / "best.pt", select_runtime("cuda")) as predictor:
        answer = predictor.answer(predictor.submit(load_image(next(synthetic.rglob("MKP_*.jpg"))), True).result())
    assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-4) and answer["gradcam_png"]


@pytest.mark.parametrize("ops", [TRAIN_OPS, TRIVIAL_TRAIN_OPS, SIMCLR_OPS], ids=["basic", "trivial", "simclr"])
def test_batch_augment_on_cuda_equals_the_cpu_path(ops):
    """Random parameters are drawn on the CPU, so one seed gives the same augmentations on both devices."""
    x = torch.randint(0, 256, (16, 3, 73, 73), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = BatchAugment(64, ops)
    cpu = aug(x, torch.Generator().manual_seed(1))
    gpu = aug(x.to("cuda"), torch.Generator().manual_seed(1)).cpu()
    assert torch.allclose(cpu, gpu, atol=2e-3), (cpu - gpu).abs().max()


def test_checkpoints_move_between_cuda_and_cpu(synthetic, tmp_path):
    for k, (device, other) in enumerate((("cuda", "cpu"), ("cpu", "cuda"))):
        out = tmp_path / f"run{k}"  # not named by its device: README's dry run on CPU reads "cuda" as "cpu"
        args = train_args(synthetic, out, "--epochs", 1)
        assert train.main([a if a != "cpu" else device for a in args]) == 0
        images = torch.randint(0, 256, (8, 3, 37, 37), dtype=torch.uint8)
        here, there = select_runtime(device, "fp32"), select_runtime(other, "fp32")
        a = predict(load_classifier(out / "best.pt", here)[0], images, here)
        b = predict(load_classifier(out / "best.pt", there)[0], images, there)
        assert torch.allclose(a, b, atol=1e-4)


def test_resume_on_cuda_with_deterministic_kernels_is_exact(synthetic, tmp_path, monkeypatch):
    """--deterministic: cuDNN's deterministic kernels, no benchmark mode; every epoch seeds its own
    streams, so the resumed run repeats the uninterrupted one bit for bit."""
    args = ["--epochs", 3, "--model", "resnet18", "--input-size", 32, "--batch-size", 16, "--save-every", 0,
            "--augment", "trivial", "--mixup", 0.2, "--cutmix", 1.0, "--ema", 0.99, "--deterministic"]
    assert train.main(cuda_args(synthetic, tmp_path / "full", *args)) == 0
    revive = killed_on_call(monkeypatch, train, "validate", 3)
    assert train.main(cuda_args(synthetic, tmp_path / "cut", *args)) == 130
    revive()
    assert train.main(cuda_args(synthetic, tmp_path / "cut", *args, "--resume")) == 0
    full, cut = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "cut"))
    for k, v in full["state_dict"].items():
        assert torch.equal(v, cut["state_dict"][k]), k
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in cut["history"]]


def test_torchrun_one_process_joins_an_nccl_group(synthetic, tmp_path):
    """What one GPU can prove of NCCL: a process group of one rank on it, set up after the rank took
    its device, and a run through it. (NCCL refuses two ranks on one GPU; several GPUs are needed to
    prove gradient averaging over NCCL, which the gloo tests prove on CPU.)"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "train.py", *map(str, cuda_args(synthetic, tmp_path / "r", "--epochs", 1))],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["backend"] == "nccl" and config["world_size"] == 1


def test_compiled_with_cuda_graphs_and_an_ema_trains_like_eager(synthetic, tmp_path):
    """Compiled with CUDA graphs, the first epoch's losses are eager's to rounding, and the second runs
    (train and eval graphs both replayed again). Only the first is compared: on this tiny set rounding
    alone grows fast (on a CPU, eager with 1 thread against 2 differs by 6% in epoch 2's Valid loss and
    0.05% in epoch 1's)."""
    common = ["--epochs", 2, "--model", "resnet18", "--input-size", 32, "--ema", 0.99, "--augment", "trivial",
              "--mixup", 0.2, "--precision", "fp32"]
    assert train.main(cuda_args(synthetic, tmp_path / "eager", *common)) == 0
    assert train.main(cuda_args(synthetic, tmp_path / "graphs", *common, "--compile", "reduce-overhead")) == 0
    eager, graphs = (torch.load(tmp_path / d / "last.pt", weights_only=True)["history"] for d in ("eager", "graphs"))
    assert len(graphs) == 2 and all(math.isfinite(h[k]) for h in graphs for k in ("train_loss", "valid_loss"))
    assert graphs[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=0.02)
    assert graphs[0]["valid_loss"] == pytest.approx(eager[0]["valid_loss"], rel=0.02)


def test_folds_side_by_side_on_one_gpu_equal_folds_in_turn(synthetic, tmp_path):
    common = ["--fold", "all", "--epochs", 1, "--model", "resnet18", "--input-size", 32, "--deterministic"]
    assert train.main(cuda_args(synthetic, tmp_path / "turn", *common)) == 0
    assert train.main(cuda_args(synthetic, tmp_path / "jobs", *common, "--jobs", 5)) == 0
    for k in range(1, 6):
        a, b = (torch.load(tmp_path / d / f"fold{k}" / "last.pt", weights_only=True) for d in ("turn", "jobs"))
        assert all(torch.equal(v, b["state_dict"][n]) for n, v in a["state_dict"].items()), k


def test_benchmark_on_cuda_reports_the_share_of_peak(monkeypatch):
    monkeypatch.setattr(train, "BENCHMARK_SECONDS", 0.2)
    rows = train.run(train.parse_args(["--benchmark", "--model", "resnet18", "--input-size", "64",
                                       "--batch-size", "32", "--device", "cuda", "--peak-tflops", "100"]))
    assert len(rows) == 4 and all(0 < r["peak_share"] < 1 for r in rows)
    bf16 = next(r for r in rows if r["precision"] == "bf16" and r["layout"] == "channels_last")
    assert bf16["full"] > 0 and bf16["bare"] > 0


def test_adam_and_adamw_are_fused_on_cuda_and_step_as_on_the_cpu():
    """One kernel per step for all parameters (foreach, PyTorch's default on CUDA, is a chain of them);
    the same update as the CPU's, to float32 rounding."""
    for name in ("adam", "adamw"):
        nets = {d: build_model("lenet", 6).to(d) for d in ("cpu", "cuda")}
        nets["cuda"].load_state_dict(nets["cpu"].state_dict())
        for device, net in nets.items():
            opt = make_optimizer(name, param_groups(net, 0.05), 1e-2)
            assert bool(opt.param_groups[0].get("fused")) == (device == "cuda")
            for p in net.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        for (k, a), b in zip(nets["cpu"].state_dict().items(), nets["cuda"].state_dict().values()):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6, msg=k)
