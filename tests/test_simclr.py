import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import simclr
import train
from conftest import assert_one_line_error, run_script, train_args
from getData import batch_indices, index_split, resize_size
from models import LARS, build_model
from simclr import Monitor, knn_accuracy, nt_xent
from testing import embed


def slow_nt_xent(z1, z2, t):
    """The loss written pair by pair, straight from eq. 1 of the SimCLR paper."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n2, n = len(z), len(z1)
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n2


def _pair(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_nt_xent_matches_the_pairwise_loop():
    z1, z2 = _pair()
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(slow_nt_xent(z1, z2, 0.3), rel=1e-5)


def test_nt_xent_closed_forms():
    n, t = 4, 0.5
    same = torch.ones(n, 3)
    assert nt_xent(same, same, t).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)  # all equally similar
    ortho = torch.eye(n)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))  # partner 1, all others 0
    assert nt_xent(ortho, ortho, t).item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_invariant_to_batch_order_and_reads_n_from_the_batch():
    z1, z2 = _pair(7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    assert nt_xent(z1[perm], z2[perm]).item() == pytest.approx(nt_xent(z1, z2).item(), rel=1e-6)
    for n in (1, 2, 3):  # a last, smaller batch
        a, b = z1[:n], z2[:n]
        assert nt_xent(a, b, 0.2).item() == pytest.approx(slow_nt_xent(a, b, 0.2), rel=1e-5, abs=1e-6)
    assert [len(b) for b in batch_indices(10, 4, torch.Generator(), drop_last=False)] == [4, 4, 2]


def test_nt_xent_is_stable_in_bf16_autocast():
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 8)
    x1, x2 = torch.randn(32, 16), torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = proj(x1), proj(x2)
        assert z1.dtype == torch.bfloat16
        loss = nt_xent(z1, z2, 0.07)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in proj.parameters())
    assert loss.item() == pytest.approx(nt_xent(proj(x1), proj(x2), 0.07).item(), rel=0.05)


def test_lars_scales_each_weight_step_by_its_trust_ratio():
    w = torch.nn.Parameter(torch.full((2, 2), 2.0))
    b = torch.nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=0.001)
    w.grad, b.grad = torch.full((2, 2), 0.5), torch.full((2,), 0.5)
    opt.step()
    trust = 0.001 * 4.0 / 1.0  # ||w|| = 4, ||g|| = 1
    assert torch.allclose(w, torch.full((2, 2), 2.0 - 0.1 * trust * 0.5))
    assert torch.allclose(b, torch.full((2,), 1.0 - 0.1 * 0.5))  # biases: plain SGD


def _ddp_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 4))
    a, b = _pair(8, 8, seed=3)
    n = len(a) // world
    loss = nt_xent(model(a[rank * n:(rank + 1) * n]), model(b[rank * n:(rank + 1) * n]), 0.5)
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    if rank == 0:
        torch.save({"loss": mean / world, "grads": [p.grad for p in model.parameters()]}, path)
    dist.destroy_process_group()


def test_ddp_gathers_negatives_with_gradients(tmp_path):
    """2 gloo processes, half the batch each: the same loss and gradients as one process on all of it."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    a, b = _pair(8, 8, seed=3)
    loss = nt_xent(model(a), model(b), 0.5)
    loss.backward()
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    for got, want in zip(ddp["grads"], model.parameters()):
        assert torch.allclose(got, want.grad, atol=1e-6)


def test_knn_accuracy_on_separable_features():
    x = torch.cat([torch.randn(20, 4) + 5 * torch.eye(4)[i] for i in range(3)])
    y = torch.arange(3).repeat_interleave(20)
    assert knn_accuracy(x, y, x + 0.01, y, k=5) == 1.0


def test_unlabeled_images_leave_out_the_test_split(synthetic, tmp_path):
    extra = tmp_path / "extra" / "deep" / "er"
    extra.mkdir(parents=True)
    test_img = index_split(synthetic, 1, "Test")[0][0]
    shutil.copy(test_img, extra / "renamed.jpg")  # same content, other name
    shutil.copy(test_img, extra / f"{test_img.stem}__aug01.jpg")  # an augmented copy, by name
    shutil.copy(index_split(synthetic, 1, "Train")[0][0], extra / "other.jpg")
    files, excluded = simclr.unlabeled_files(synthetic, 1, [tmp_path / "extra"])
    train_valid = len(index_split(synthetic, 1, "Train")) + len(index_split(synthetic, 1, "Valid"))
    assert len(files) == train_valid + 1 and excluded == 2
    assert not {p.name for p, _ in index_split(synthetic, 1, "Test")} & {p.name for p in files}
    with_test, _ = simclr.unlabeled_files(synthetic, 1, [tmp_path / "extra"], include_test=True)
    assert len(with_test) == len(files) + len(index_split(synthetic, 1, "Test")) + 2


def _mean_knn(synthetic, init):
    accs = []
    for fold in range(1, 6):
        m = Monitor.for_fold(synthetic, fold, resize_size(32), 5)
        torch.manual_seed(0)
        enc = build_model("lenet", 6, init=init).eval()
        accs.append(knn_accuracy(embed(enc, m.train_x, torch.device("cpu")), m.train_y,
                                 embed(enc, m.valid_x, torch.device("cpu")), m.valid_y, 5))
    return float(np.mean(accs))


def test_pretraining_improves_knn_and_feeds_train(synthetic, tmp_path):
    out = tmp_path / "simclr"
    assert simclr.main(["--data-root", str(synthetic), "--out", str(out), "--epochs", "60", "--eval-every", "20",
                        "--device", "cpu"]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "files.txt", "history.csv", "loss.png", "last.pt",
                                               "encoder.pt"}
    config = __import__("json").loads((out / "config.json").read_text())
    assert len((out / "files.txt").read_text().splitlines()) == config["n_images"] == \
        len(index_split(synthetic, 1, "Train")) + len(index_split(synthetic, 1, "Valid"))
    before, after = _mean_knn(synthetic, "none"), _mean_knn(synthetic, str(out / "encoder.pt"))
    assert after >= before + 0.08, (before, after)  # measured: 0.25 -> 0.44
    assert train.main(train_args(synthetic, tmp_path / "ft", "--epochs", 1, "--init", out / "encoder.pt")) == 0
    proc = run_script("train.py", *train_args(synthetic, tmp_path / "bad", "--epochs", 1, "--model", "resnet18",
                                              "--init", out / "encoder.pt"))
    assert_one_line_error(proc, "checkpoint is for lenet, not resnet18")


def test_resume_matches_an_uninterrupted_run(synthetic, tmp_path, monkeypatch):
    args = ["--data-root", str(synthetic), "--epochs", "3", "--eval-every", "2", "--device", "cpu"]
    assert simclr.main([*args, "--out", str(tmp_path / "full")]) == 0
    real, calls = simclr.pretrain_epoch, {"n": 0}

    def dies_in_epoch_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(simclr, "pretrain_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        simclr.main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(simclr, "pretrain_epoch", real)
    assert simclr.main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "cut"))
    for k, v in full["state_dict"].items():
        assert torch.equal(v, cut["state_dict"][k]), k
    assert [h["loss"] for h in full["history"]] == [h["loss"] for h in cut["history"]]


def test_bad_arguments(synthetic, tmp_path):
    assert_one_line_error(run_script("simclr.py", "--data-root", synthetic, "--temperature", "0"), "--temperature")
    assert_one_line_error(run_script("simclr.py", "--data-root", synthetic, "--extra", tmp_path / "nope",
                                     "--out", tmp_path / "o"), "--extra")
