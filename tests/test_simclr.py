import concurrent.futures
import hashlib
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

import simclr
import train
from conftest import (REPO, assert_one_line_error, drawn, interrupt_when, killed_on_call, run_cli,
                      start_as_from_a_terminal, train_args)
from getData import index_split, patient_id
from models import LARS, ModelError, batch_indices, build_model, embed, resize_size, select_runtime
from simclr import Monitor, knn_accuracy, nt_xent, patient_partners, second_images, unlabeled_files


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
    # The DDP wrapper goes before its group, as train.py's and simclr.py's do when their fold returns:
    # freed after it, its Reducer destroys the gloo group while holding the GIL, and torch 2.11 then
    # deadlocks about one run in three (a gloo thread waits for the GIL to free a tensor).
    del model
    dist.destroy_process_group()


def test_ddp_gathers_negatives_with_gradients(tmp_path):
    """2 gloo processes, half the batch each: the same loss and gradients as one process on all of it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp.pt")), nprocs=2, join=False)
    deadline = time.monotonic() + 120  # a hang fails the test instead of stalling the suite
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for p in workers.processes:
                p.kill()
            pytest.fail("the two gloo processes did not finish in 120 s")
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
    near = torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, -0.2], [1.0, 0.25]])  # the nearest is of class 0, the next
    y = torch.tensor([0, 1, 1, 1])  # two of class 1: a majority of the k nearest votes, not the nearest alone
    assert knn_accuracy(near, y, near[:1], torch.tensor([1]), k=3) == 1.0
    assert knn_accuracy(near, y, near[:1], torch.tensor([1]), k=1) == 0.0


def test_unlabeled_images_leave_out_the_test_split(synthetic, tmp_path):
    extra = tmp_path / "extra" / "deep" / "er"
    extra.mkdir(parents=True)
    test_img = index_split(synthetic, 1, "Test")[0][0]
    shutil.copy(test_img, extra / "renamed.jpg")  # same content, other name
    shutil.copy(test_img, extra / f"{test_img.stem}__aug01.jpg")  # an augmented copy, by name
    shutil.copy(index_split(synthetic, 1, "Train")[0][0], extra / "copy.jpg")  # in the set already: a false negative
    Image.new("RGB", (40, 30), (200, 120, 90)).save(extra / "other.jpg")
    shutil.copy(extra / "other.jpg", extra / "other again.jpg")
    files, splits, left_out = unlabeled_files(synthetic, 1, [tmp_path / "extra"])
    train_valid = len(index_split(synthetic, 1, "Train")) + len(index_split(synthetic, 1, "Valid"))
    assert len(files) == train_valid + 1 and left_out == {"test": 2, "repeated": 2}
    everything, _, left_out = unlabeled_files(synthetic, 1, [synthetic])  # the dataset: its folds share photos
    assert left_out["repeated"] > 0
    assert len({hashlib.sha1(p.read_bytes()).digest() for p in everything}) == len(everything)
    assert not {p.name for p, _ in index_split(synthetic, 1, "Test")} & {p.name for p in files}
    with_test, _, _ = unlabeled_files(synthetic, 1, [tmp_path / "extra"], include_test=True)
    assert splits.count("extra") == 1 and splits[:len(index_split(synthetic, 1, "Train"))] == ["Train"] * len(
        index_split(synthetic, 1, "Train"))
    assert len(with_test) == len(files) + len(index_split(synthetic, 1, "Test"))  # their copies: repeats now


def _mean_knn(synthetic, init):
    accs, rt = [], select_runtime("cpu")
    for fold in range(1, 6):
        m = Monitor.for_fold(synthetic, fold, resize_size(32), 5)
        torch.manual_seed(0)
        enc = build_model("lenet", 6, init=init).eval()
        accs.append(knn_accuracy(embed(enc, m.train_x, rt), m.train_y, embed(enc, m.valid_x, rt), m.valid_y, 5))
    return float(np.mean(accs))


@pytest.mark.figures
def test_pretraining_improves_knn_and_feeds_train(synthetic, tmp_path):
    out = tmp_path / "simclr"
    assert simclr.main(["--data-root", str(synthetic), "--out", str(out), "--epochs", "60", "--eval-every", "20",
                        "--device", "cpu"]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "files.txt", "history.csv", "loss.png", "last.pt",
                                               "encoder.pt"}
    assert drawn(out / "loss.png")
    config = json.loads((out / "config.json").read_text())
    assert len((out / "files.txt").read_text().splitlines()) == config["n_images"] == \
        len(index_split(synthetic, 1, "Train")) + len(index_split(synthetic, 1, "Valid"))
    before, after = _mean_knn(synthetic, "none"), _mean_knn(synthetic, str(out / "encoder.pt"))
    assert after >= before + 0.08, (before, after)  # measured: 0.25 -> 0.44
    assert train.main(train_args(synthetic, tmp_path / "ft", "--epochs", 1, "--init", out / "encoder.pt")) == 0
    proc = run_cli("train.py", *train_args(synthetic, tmp_path / "bad", "--epochs", 1, "--model", "resnet18",
                                              "--init", out / "encoder.pt"))
    assert_one_line_error(proc, "checkpoint is for lenet, not resnet18")
    # the run directory stands for its encoder.pt, as with --checkpoint; --resume knows that file by any spelling
    assert train.main(train_args(synthetic, tmp_path / "dir", "--epochs", 1, "--init", out)) == 0
    assert json.loads((tmp_path / "dir" / "config.json").read_text())["init"] == str(out / "encoder.pt")
    spelled = os.path.relpath(out, Path.cwd()) + "/./encoder.pt"
    for init in (out, spelled):
        assert train.main(train_args(synthetic, tmp_path / "dir", "--epochs", 1, "--init", init, "--resume")) == 0
    with pytest.raises(ModelError, match=f"--init was '{out / 'encoder.pt'}', now 'none'"):
        train.run(train.parse_args(train_args(synthetic, tmp_path / "dir", "--epochs", 1, "--resume")))
    proc = run_cli("testing.py", "--checkpoint", out, "--out", tmp_path / "t")  # the run stands for its encoder
    assert_one_line_error(proc, f"{out / 'encoder.pt'}: a SimCLR encoder has no classifier head; evaluate it with")


def test_a_run_ends_saying_where_the_encoder_is_and_the_command_that_fine_tunes_it(synthetic, tmp_path):
    out = tmp_path / "a run"  # a space: the command is quoted for a shell
    proc = run_cli("simclr.py", "--data-root", synthetic, "--fold", 2, "--epochs", 1, "--device", "cpu", "--out", out)
    last = proc.stdout.splitlines()[-1]
    assert last == f"wrote encoder.pt and the run's files to {out}/; fine-tune it: python train.py --data-root " \
                   f"{synthetic} --fold 2 --model lenet --input-size 32 --init '{out / 'encoder.pt'}'"
    command = shlex.split(last.split(": ", 1)[1])
    tuned = run_cli(*command[1:], "--epochs", 1, "--device", "cpu", "--out", tmp_path / "tuned")
    assert tuned.returncode == 0, tuned.stderr  # the command it says works: the right fold, network and size


def test_last_pt_is_written_at_most_every_save_every_seconds_and_at_the_end(synthetic, tmp_path, monkeypatch):
    writes, real = [], simclr._save_epoch
    monkeypatch.setattr(simclr, "_save_epoch", lambda *a: (writes.append(len(a[6])), real(*a)))  # a[6]: history
    for every, expected in (("3600", [3]), ("0", [1, 2, 3])):
        writes.clear()
        assert simclr.main(["--data-root", str(synthetic), "--epochs", "3", "--device", "cpu", "--save-every", every,
                            "--out", str(tmp_path / every)]) == 0
        assert writes == expected
        assert torch.load(tmp_path / every / "encoder.pt", weights_only=True)["epoch"] == 3


def test_resume_matches_an_uninterrupted_run(synthetic, tmp_path, monkeypatch):
    args = ["--data-root", str(synthetic), "--epochs", "3", "--eval-every", "2", "--device", "cpu", "--save-every", "0"]
    assert simclr.main([*args, "--out", str(tmp_path / "full")]) == 0
    revive = killed_on_call(monkeypatch, simclr, "pretrain_epoch", 3)
    cut = run_cli("simclr.py", *args, "--out", tmp_path / "cut")  # Ctrl-C: one line, how to go on
    assert cut.returncode == 130 and cut.stderr.strip().splitlines()[-1] == \
        f"interrupted: the same command with --resume continues {tmp_path / 'cut'} from its last saved epoch"
    revive()
    assert simclr.main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "cut"))
    for k, v in full["state_dict"].items():
        assert torch.equal(v, cut["state_dict"][k]), k
    assert [h["loss"] for h in full["history"]] == [h["loss"] for h in cut["history"]]


def test_resume_after_the_extra_folder_changed_names_that_folder(synthetic, tmp_path):
    """The run's images changed in its --extra folder, not in --data-root, which the line named alone."""
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), np.uint8)).save(extra / f"{i}.png")
    args = ["--data-root", synthetic, "--extra", extra, "--epochs", 1, "--device", "cpu", "--out", tmp_path / "r"]
    assert simclr.main([str(a) for a in args]) == 0
    (extra / "0.png").rename(extra / "0.png.bak")
    assert_one_line_error(run_cli("simclr.py", *args, "--resume"),
                          f"the images in {synthetic} or in its --extra folders have changed since the run began "
                          "(n_images was")


def test_bad_arguments(synthetic, tmp_path):
    assert_one_line_error(run_cli("simclr.py", "--data-root", synthetic, "--temperature", "0"), "--temperature")
    assert_one_line_error(run_cli("simclr.py", "--data-root", synthetic, "--extra", tmp_path / "nope",
                                     "--out", tmp_path / "o"), "--extra", "no such folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no photos here")
    assert_one_line_error(run_cli("simclr.py", "--data-root", synthetic, "--extra", tmp_path / "notes",
                                     "--out", tmp_path / "o"), "--extra", "no images there")
    assert not (tmp_path / "o").exists()  # no run begun


# ----------------------------------------------------------------------------- torchrun, shards, patients
def _torchrun(nproc, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_two_processes_pretrain_the_real_simclr_module(synthetic, tmp_path):
    """Two gloo processes on the real SimCLR module (backbone + projector): it trains, and a global
    batch that does not divide by the ranks (7 on 2) is shared out equally, 3 images each. The
    schedule spans the steps taken (149 images: 24 batches of 6, not 25) and ends at 0."""
    out = tmp_path / "odd"
    proc = _torchrun(2, "simclr.py", "--data-root", synthetic, "--model", "lenet", "--epochs", 2, "--batch-size", 7,
                     "--warmup-epochs", 0, "--device", "cpu", "--eval-every", 1, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    last = torch.load(out / "last.pt", weights_only=True)
    assert config["world_size"] == 2 and config["backend"] == "gloo" and last["epoch"] == 2
    losses = [h["loss"] for h in last["history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # every rank drops the same share of a 7-image batch, never a different one (that would hang)
    assert losses[1] < math.log(2 * 6 - 1) + 0.5  # a global batch of 6: the loss is read over 12 views
    assert config["n_images"] % 6 and last["scheduler"]["_last_lr"] == [0.0, 0.0]


def test_the_schedule_ends_at_zero_when_a_last_batch_of_one_is_skipped(synthetic, tmp_path):
    n = len(unlabeled_files(synthetic, 1)[0])
    batch = next(b for b in range(3, n) if n % b == 1)  # one image left over: no negatives, no step
    assert simclr.main(["--data-root", str(synthetic), "--epochs", "1", "--batch-size", str(batch), "--warmup-epochs",
                        "0", "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert last["scheduler"]["last_epoch"] == n // batch and last["scheduler"]["_last_lr"] == [0.0, 0.0]


def test_a_batch_smaller_than_two_per_rank_is_a_one_line_error(synthetic, tmp_path):
    proc = _torchrun(2, "simclr.py", "--data-root", synthetic, "--epochs", 1, "--batch-size", 3, "--device", "cpu",
                     "--out", tmp_path / "o", timeout=120)
    assert proc.returncode != 0  # and promptly: no rank waits in a collective for a share it never gets
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and all("--batch-size 3: 2 process(es) need at least 4" in ln for ln in errors)
    assert 'simclr.py", line' not in proc.stderr  # no traceback from our code (torchrun reports the exit codes)


def test_a_batch_or_a_knn_larger_than_the_data_is_a_one_line_error(synthetic, tmp_path):
    """A batch of more images than the set silently became the whole set (the config said 1000); a
    k-NN monitor over more neighbours than Train images is a majority vote. Refused before any work."""
    n = len(unlabeled_files(synthetic, 1)[0])
    for flag, fragment in (("--batch-size", f"fold 1 has {n} unlabeled images"), ("--knn-k", "the k-NN monitor has")):
        assert_one_line_error(run_cli("simclr.py", "--data-root", synthetic, "--epochs", 1, flag, 1000, "--out",
                                      tmp_path / "s"), f"{flag} 1000: {fragment}")
        assert not (tmp_path / "s").exists()


def test_ctrl_c_under_torchrun_is_one_line_not_one_per_rank(synthetic, tmp_path):
    """A terminal's Ctrl-C reaches torchrun and every rank: each unwinds, rank 0 alone says how to go
    on (torchrun then prints its own SignalException traceback: torchrun's, not ours)."""
    out = tmp_path / "r"
    proc = start_as_from_a_terminal("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                                    *train_args(synthetic, out, "--epochs", 100_000))
    lines = interrupt_when(proc, lambda: (out / "best.pt").is_file(), whole_group=True)
    ours = [ln for ln in lines if ln.startswith(("interrupted", "error"))]
    assert ours == [f"interrupted: the same command with --resume continues {out} from its last saved epoch"], lines


def test_what_rank0_refuses_stops_every_rank_with_its_one_line(synthetic, tmp_path):
    """Rank 0 alone resolves the data root and claims the run directory: its refusal stops the other
    rank too, which is not left waiting in a broadcast to die with gloo's "Connection reset by peer"
    traceback; one line says why, not one per rank."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text("{}")
    cases = (("train.py", ["--data-root", tmp_path / "missing"], "no such folder"),
             ("simclr.py", ["--data-root", synthetic, "--out", busy], "holds a run already"))
    with concurrent.futures.ThreadPoolExecutor() as pool:  # both at once: each is mostly a torch import per process
        procs = list(pool.map(lambda case: _torchrun(2, case[0], *case[1], "--epochs", 1, "--device", "cpu",
                                                     timeout=120), cases))
    for (script, _, message), proc in zip(cases, procs):
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Connection reset" not in proc.stderr and f'{script}", line' not in proc.stderr


def test_patient_pairs_stay_in_their_split_and_single_photos_pair_with_themselves(synthetic):
    files, splits, _ = unlabeled_files(synthetic, 1, include_test=True)
    table, count = patient_partners(files, splits)
    assert (count > 0).any() and (count == 0).any()  # some patients have several photos, some one
    for i in range(len(files)):
        for j in table[i, :count[i]].tolist():
            assert j != i and splits[j] == splits[i] and patient_id(files[j]) == patient_id(files[i])
        siblings = [j for j in range(len(files)) if j != i and splits[j] == splits[i]
                    and patient_id(files[j]) == patient_id(files[i])]
        assert sorted(table[i, :count[i]].tolist()) == sorted(siblings)  # every sibling is a candidate
    idx = torch.arange(len(files))
    drawn = torch.stack([second_images(idx, (table, count), torch.Generator().manual_seed(s)) for s in range(20)])
    alone = count == 0
    assert torch.equal(drawn[:, alone], idx[alone].expand(20, -1))  # single photos: two views of themselves
    assert (drawn[:, ~alone] != idx[~alone]).all()  # others: always another photo of the patient
    assert torch.equal(second_images(idx, None, torch.Generator()), idx)  # --positives views


def test_patient_positives_pretrain(synthetic, tmp_path):
    out = tmp_path / "micle"
    assert simclr.main(["--data-root", str(synthetic), "--out", str(out), "--epochs", "2", "--positives", "patient",
                        "--device", "cpu", "--model", "LeNet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["positives"] == "patient" and 0 < config["patient_pairs"] < config["n_images"]
    assert config["model"] == "lenet"  # as models/ names it: resumed with --model lenet or LeNet alike
