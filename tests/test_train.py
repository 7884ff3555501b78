import csv
import fcntl
import json
import os
import pty
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import train
from augment import write_augmented
from conftest import (REPO, assert_one_line_error, at_once, ctrl_c_as_from_a_terminal, drawn, interrupt_when,
                      killed_on_call, run_cli, signal_in_a_finalizer, start_as_from_a_terminal,
                      start_in_the_background, train_args)
from getData import audit, index_split, list_classes, stop_if_asked
from models import ModelError, build_model, checkpoint_dict, save_checkpoint, select_runtime, warmup_cosine
from testing import evaluate


def _history(out):
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_is_scikit_learns_to_the_bit():
    from sklearn.metrics import balanced_accuracy_score
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 33, 500):  # classes missing from the labels or from the predictions included
        y, pred = torch.randint(6, (n,), generator=g), torch.randint(6, (n,), generator=g)
        pred[: n // 2] = y[: n // 2]
        assert train.balanced_accuracy(y, pred) == balanced_accuracy_score(y.numpy(), pred.numpy())
    assert train.balanced_accuracy(torch.tensor([0, 0, 0, 2]), torch.tensor([0, 1, 1, 2])) == (1 / 3 + 1) / 2


def test_training_beats_chance_on_test(trained, tmp_path):
    m = evaluate(trained / "best.pt", tmp_path / "test")["softmax"].metrics
    majority = max(np.bincount([list(m["per_class"]).index(c) for c, v in m["per_class"].items()
                                for _ in range(v["support"])])) / m["n"]
    assert m["accuracy"] >= majority + 0.2, (m["accuracy"], majority)  # constant predictor: `majority`
    assert m["balanced_accuracy"] >= 1 / 6 + 0.2


def test_run_directory_contents(trained):
    assert {p.name for p in trained.iterdir()} >= {"config.json", "history.csv", "curves.png", "best.pt", "last.pt"}
    config = json.loads((trained / "config.json").read_text())
    assert config["model"] == "lenet" and config["fold"] == 1 and config["classes"][5] == "Monkeypox"
    assert len(_history(trained)) == 40
    best = torch.load(trained / "best.pt", weights_only=True)
    last = torch.load(trained / "last.pt", weights_only=True)
    assert best["kind"] == "classifier" and best["fold"] == 1 and best["config"] == config
    assert {"optimizer", "scheduler", "history"} <= set(last) and "rng" not in last and last["epoch"] == 40
    assert best["metric"]["valid_bal_acc"] == max(float(r["valid_bal_acc"]) for r in _history(trained))
    assert best["temperature"] > 0 and best["temperature"] != 1.0  # fitted on Valid
    curves = Image.open(trained / "curves.png")  # the session fixture's, drawn: set up before figures_built_not_drawn
    assert curves.format == "PNG" and curves.size[0] > 500 and drawn(trained / "curves.png")


def test_test_split_is_never_read_during_training(synthetic, tmp_path, monkeypatch):
    seen = []
    real = train.MSLDDataset

    def spy(root, fold, split, *a, **k):
        seen.append(split)
        return real(root, fold, split, *a, **k)
    monkeypatch.setattr(train, "MSLDDataset", spy)
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 1)) == 0
    assert sorted(seen) == ["Train", "Valid"]


def test_resume_matches_an_uninterrupted_run(synthetic, tmp_path, monkeypatch):
    args = ["--epochs", 4, "--batch-size", 16, "--balance", "sampler", "--model", "lenet", "--save-every", 0]
    assert train.main(train_args(synthetic, tmp_path / "full", *args)) == 0

    revive = killed_on_call(monkeypatch, train, "validate", 3)  # the process dies before epoch 3 is saved
    assert train.main(train_args(synthetic, tmp_path / "cut", *args)) == 130
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 2
    assert "ood" not in torch.load(tmp_path / "cut" / "best.pt", weights_only=True)  # fitted once the run ends
    revive()
    assert train.main(train_args(synthetic, tmp_path / "cut", *args, "--resume")) == 0
    full_ood, cut_ood = (torch.load(tmp_path / r / "best.pt", weights_only=True)["ood"] for r in ("full", "cut"))
    assert torch.equal(full_ood["layers"]["head"]["precision"], cut_ood["layers"]["head"]["precision"])
    assert full_ood["thresholds"] == cut_ood["thresholds"]

    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k, v in full["state_dict"].items():
        assert torch.equal(v, cut["state_dict"][k]), k
    def strip(rows):  # timings differ between runs; everything else must not
        return [{k: v for k, v in r.items() if k not in ("epoch_s", "train_images_per_s")} for r in rows]
    assert strip(_history(tmp_path / "full")) == strip(_history(tmp_path / "cut"))


def test_a_run_older_than_a_flag_resumes_as_if_it_had_its_default(synthetic, tmp_path):
    """The code updated mid-run (a `git pull`): last.pt's config lacks the new flag, which the run had
    at its default; the same command resumes, and a changed value of it is still refused."""
    out = tmp_path / "run"
    assert train.main(train_args(synthetic, out, "--epochs", 2, "--save-every", 0)) == 0
    last = torch.load(out / "last.pt", weights_only=True)
    del last["config"]["cutmix"]  # as if --cutmix were newer than the run
    save_checkpoint(dict(last, epoch=1, history=last["history"][:1]), out / "last.pt")
    assert train.main(train_args(synthetic, out, "--epochs", 2, "--resume")) == 0
    save_checkpoint(dict(last, epoch=1, history=last["history"][:1]), out / "last.pt")
    assert_one_line_error(run_cli("train.py", *train_args(synthetic, out, "--epochs", 2, "--resume", "--cutmix", 1)),
                          "--cutmix was 0.0, now 1.0")


def test_last_pt_is_written_at_most_every_save_every_seconds_and_at_the_end(synthetic, tmp_path, monkeypatch):
    writes, real = [], train.save_checkpoint

    def counting(ckpt, path):
        if path.name == "last.pt":
            writes.append(ckpt["epoch"])
        real(ckpt, path)
    monkeypatch.setattr(train, "save_checkpoint", counting)
    for every, expected in (("3600", [3]), ("0", [1, 2, 3])):
        writes.clear()
        assert train.main(train_args(synthetic, tmp_path / every, "--epochs", 3, "--save-every", every)) == 0
        assert writes == expected
        assert len(_history(tmp_path / every)) == 3  # the history is complete all the same


def test_resume_refuses_changed_arguments(synthetic, tmp_path):
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 1)) == 0
    with pytest.raises(ModelError, match="--lr was 0.002, now 0.1"):
        train.run(train.parse_args(train_args(synthetic, tmp_path / "r", "--epochs", 1, "--lr", 0.1, "--resume")))


def test_fold_all_writes_summary(trained_all):
    summary = (trained_all / "summary.md").read_text()
    assert all((trained_all / f"fold{k}" / "best.pt").is_file() for k in range(1, 6))
    assert "mean ± std" in summary and all(f"| {k} |" in summary for k in range(1, 6))


def test_ddp_two_gloo_processes_match_one_process(synthetic, tmp_path):
    common = ["--epochs", 1, "--batch-size", 16, "--augment", "none", "--device", "cpu"]
    single = run_cli("train.py", "--data-root", synthetic, "--out", tmp_path / "one", *common)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = __import__("subprocess").run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         "--data-root", str(synthetic), "--out", str(tmp_path / "two"), *map(str, common)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _history(tmp_path / "one")[0], _history(tmp_path / "two")[0]
    assert float(two["train_loss"]) == pytest.approx(float(one["train_loss"]), rel=1e-5)
    assert float(two["valid_loss"]) == pytest.approx(float(one["valid_loss"]), rel=1e-4)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["backend"] == "gloo"


@pytest.mark.parametrize("fold", ["1", "all"])
def test_a_run_ends_saying_where_it_is_and_the_command_that_evaluates_it(synthetic, tmp_path, fold):
    out = tmp_path / "a run"  # a space: the command is quoted for a shell
    proc = run_cli("train.py", *train_args(synthetic, out, "--epochs", 1, "--fold", fold))
    written = "summary.md and fold1..5/" if fold == "all" else "best.pt, last.pt, history.csv and curves.png"
    assert proc.stdout.splitlines()[-1] == f"wrote {written} to {out}/; evaluate on Test: python testing.py " \
                                           f"--checkpoint '{out}'"
    if fold == "1":  # the command it says works (testing.py of a --fold all run: test_testing.py)
        command = shlex.split(proc.stdout.splitlines()[-1].split(": ", 1)[1])
        assert run_cli(*command[1:], "--bootstrap", 10).returncode == 0


def test_bad_arguments_are_one_line_errors(synthetic, tmp_path):
    base = ("train.py", "--data-root", synthetic, "--out", tmp_path / "r", "--epochs", "1")
    assert_one_line_error(run_cli("train.py", "--data-root", tmp_path / "missing"), "no such folder")
    assert_one_line_error(run_cli(*base, "--model", "resnet19"), "unknown or unsupported model")
    assert_one_line_error(run_cli(*base, "--fold", "7"), "--fold 7")
    lenet = tmp_path / "lenet.pt"
    save_checkpoint(checkpoint_dict(build_model("lenet", 6), "classifier", list_classes(synthetic), {}, 1, {}), lenet)
    assert_one_line_error(run_cli(*base, "--model", "resnet18", "--init", lenet), "checkpoint is for lenet")
    assert not (tmp_path / "r" / "best.pt").exists()


def test_a_model_name_in_any_case_is_one_model(synthetic, tmp_path):
    """`--model LeNet` trained LeNet but wrote 'LeNet' into config.json, so the same run resumed with
    `--model lenet` was refused as a changed flag: a name is written as models/ knows it."""
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 1, "--model", "LeNet")) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"] == "lenet"
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 1, "--model", "lenet", "--resume")) == 0


def test_clipping_bounds_the_gradient_a_step_takes():
    """--clip-grad: with plain SGD at learning rate 1 a step moves the weights by the gradient, so the
    step's length is the gradient's norm: the bound when clipped, more without."""
    x = 100 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0))  # large inputs: a large gradient
    lengths = {}
    for clip in (0.0, 0.01):
        net = nn.Linear(4, 3)
        before = torch.cat([p.detach().flatten() for p in net.parameters()])
        step = train.Step(net, torch.optim.SGD(net.parameters(), lr=1.0), None, nn.CrossEntropyLoss(), aug=None,
                          clip_grad=clip)
        train.optimise(step, x, torch.arange(8) % 3, select_runtime("cpu", "fp32"), torch.zeros(3))
        lengths[clip] = float((torch.cat([p.detach().flatten() for p in net.parameters()]) - before).norm())
    assert lengths[0.01] == pytest.approx(0.01, rel=1e-4) and lengths[0.0] > 1, lengths


def test_balancing_helpers():
    targets = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    w = train.class_weights(targets, 3)
    assert w[2] > w[1] > w[0] and w.mean() == pytest.approx(1.0)
    assert torch.allclose(w * torch.bincount(targets), torch.full((3,), float((w * torch.bincount(targets))[0])))
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.0)
    absent = train.class_weights(torch.tensor([0] * 80 + [2] * 20), 3)  # mean 1 over the classes present
    assert absent[1] == 0 and (absent[0] + absent[2]) / 2 == pytest.approx(1.0)


def test_the_warm_up_lasts_its_epochs(trained):
    """--warmup-epochs counts epochs (`trained` has the default, 3), not steps: the learning rate at each
    epoch's start rises until the one after the warm-up, which starts the cosine at the full rate."""
    lr = [float(row["lr"]) for row in _history(trained)]
    top, warm = train.DEFAULTS["lr"], train.DEFAULTS["warmup_epochs"]
    steps = round(top / (warm * lr[0]))  # per epoch: the first step runs at top / (warm x steps)
    assert steps > 1 and lr[:warm] == pytest.approx([top * (k * steps + 1) / (warm * steps) for k in range(warm)])
    assert lr[warm] == pytest.approx(top) and lr[warm + 1] < lr[warm]


def test_the_loss_smooths_labels_and_balances_classes_as_asked():
    """--label-smoothing e: the target is 1 - e on the class and e / C on every class (Szegedy et al.
    2016); --balance loss weights each image by its class's inverse frequency, sampler draws by it."""
    data = type("Fold", (), dict(train_labels=torch.tensor([0] * 8 + [1] * 2), classes=["a", "b"]))
    rt, logits, y = select_runtime("cpu", "fp32"), torch.tensor([[2.0, -1.0], [0.5, 1.5]]), torch.tensor([0, 1])
    log_p = logits.log_softmax(1)
    for e in (0.0, 0.2):
        loss_fn, _ = train.balancing("none", e, data, rt)
        target = (1 - e) * F.one_hot(y, 2) + e / 2
        assert float(loss_fn(logits, y)) == pytest.approx(float(-(target * log_p).sum(1).mean()))
    loss_fn, none = train.balancing("loss", 0.0, data, rt)
    w = torch.tensor([10 / 16, 10 / 4])  # n / (C n_c)
    weighted = -(w[y] * log_p[[0, 1], y]).sum() / w[y].sum()
    assert none is None and float(loss_fn(logits, y)) == pytest.approx(float(weighted))
    _, per_image = train.balancing("sampler", 0.0, data, rt)
    assert torch.allclose(per_image, w[data.train_labels] / w.mean())


def test_aug_dir_copies_join_training(synthetic, tmp_path):
    write_augmented(synthetic, 1, tmp_path / "aug", factor=1, ops="hflip", workers=1)
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 1, "--aug-dir", tmp_path / "aug")) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["train_images"] == 2 * len(index_split(synthetic, 1, "Train"))


def test_aug_dir_copies_of_the_folds_held_out_photos_are_refused_as_the_audit_fails_them(synthetic, tmp_path):
    """Copies made from another fold's Train hold this fold's Test photos (MSLD's folds share photos):
    the network would be scored on photos it trained on. The audit's verdict, the same count."""
    aug = tmp_path / "aug"
    write_augmented(synthetic, 2, aug, factor=1, ops="hflip", workers=1)
    test_photo = index_split(synthetic, 2, "Test")[0][0]  # one of them planted, as another fold's copy would be
    shutil.copy(test_photo, aug / test_photo.parent.name / f"{test_photo.stem}__aug07.jpg")
    proc = run_cli("train.py", *train_args(synthetic, tmp_path / "r", "--fold", 2, "--epochs", 1, "--aug-dir", aug))
    assert_one_line_error(proc, str(aug), "1 of fold 2's Valid and Test photos or copies of them",
                          f"a copy of Test image {test_photo.stem}", "augment.py --fold 2")
    assert not (tmp_path / "r").exists()
    fails = next(c for c in audit(synthetic, {2: aug})["checks"] if c["check"] == "augmented copies of held-out images")
    assert fails["verdict"] == "FAIL" and len(fails["items"]) == 1


def test_init_from_a_network_that_saw_the_folds_held_out_photos_is_refused(synthetic, trained, tmp_path):
    """The synthetic folds share photos as MSLD's do: a network of fold 1 has seen some of fold 2's
    Valid and Test photos, and would start fold 2 knowing them."""
    seen = {p.name for p, _ in index_split(synthetic, 1, "Train")}
    n = sum(p.name in seen for s in ("Valid", "Test") for p, _ in index_split(synthetic, 2, s))
    assert n > 0
    proc = run_cli("train.py", *train_args(synthetic, tmp_path / "r", "--fold", 2, "--init", trained / "best.pt"))
    assert_one_line_error(proc, f"learned from fold 1's photos, {n} of fold 2's", "simclr.py --fold 2")
    assert_one_line_error(run_cli("simclr.py", "--data-root", synthetic, "--fold", 2, "--init", trained / "best.pt",
                                  "--out", tmp_path / "s"), f"{n} of fold 2's")  # pre-training too
    renamed = shutil.copy(trained / "best.pt", tmp_path / "weights.pth")  # whatever its name
    assert_one_line_error(run_cli("train.py", *train_args(synthetic, tmp_path / "r", "--fold", 2, "--init", renamed)),
                          f"{n} of fold 2's")
    assert train.main(train_args(synthetic, tmp_path / "ok", "--epochs", 1, "--init", trained / "best.pt")) == 0


def _screen(raw: bytes) -> list[str]:
    """What a terminal shows: each carriage return rewrites its line from the first column."""
    lines = []
    for line in raw.decode(errors="replace").replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return [ln for ln in lines if ln.strip()]


def test_a_fresh_clones_main_job_in_a_terminal_falls_back_to_synthetic_data_and_wipes_its_bars(synthetic, tmp_path):
    """`python train.py` where data/ holds no dataset (here the download, not yet extracted): it says
    so and how to use the download, writes the synthetic set and trains on it, with no warning; on a
    terminal its progress bars are wiped before each epoch's summary line, and its last line says
    where the run is. (One process for both: a fresh interpreter is 2 s of torch import.)"""
    (tmp_path / "data").mkdir()
    with zipfile.ZipFile(tmp_path / "data" / "archive.zip", "w") as z:
        z.writestr("readme.txt", "MSLD v2.0")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    proc = subprocess.Popen([sys.executable, REPO / "train.py", "--epochs", "2", "--device", "cpu"], cwd=tmp_path,
                            stdout=follower, stderr=follower)
    os.close(follower)
    raw = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    assert proc.wait() == 0, raw[-3000:]
    assert b"it/s]" in raw or b"s/it]" in raw  # a bar was drawn
    screen = _screen(raw)
    assert "Warning" not in "\n".join(screen) and "no MSLD v2.0 found under data/" in screen[0], screen
    assert "python getData.py --extract 'data/archive.zip'" in screen[0]  # and how to use the download
    assert (tmp_path / "data" / "synthetic" / "SYNTHETIC.txt").is_file()
    assert (tmp_path / "runs" / "lenet-fold1" / "best.pt").is_file()
    assert screen[-1].startswith("wrote best.pt") and screen[-2].startswith("fold 1 epoch 2/2: train loss") \
        and "%|" not in screen[-2], screen[-3:]
    assert screen[-3].startswith("fold 1 epoch 1/2: train loss") and "%|" not in screen[-3], screen[-3:]
    logged = run_cli("train.py", *train_args(synthetic, tmp_path / "log", "--epochs", 1))  # output not a terminal
    assert logged.returncode == 0 and "%|" not in logged.stderr + logged.stdout  # no bars in logs


def test_resume_with_dropout_matches_an_uninterrupted_run(synthetic, tmp_path, monkeypatch):
    """MobileNetV3 keeps a dropout layer before our head: its draws come from torch's global generator,
    seeded per epoch and rank, so a resumed run needs no saved random state to repeat them."""
    args = ["--epochs", 2, "--model", "mobilenet_v3_small", "--input-size", 32, "--save-every", 0]
    assert train.main(train_args(synthetic, tmp_path / "full", *args)) == 0
    revive = killed_on_call(monkeypatch, train, "validate", 2)  # in epoch 2: last.pt holds epoch 1
    assert train.main(train_args(synthetic, tmp_path / "cut", *args)) == 130
    revive()
    torch.rand(1000)  # whatever this process drew in between
    assert train.main(train_args(synthetic, tmp_path / "cut", *args, "--resume")) == 0
    full, cut = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "cut"))
    assert "rng" not in cut
    for k, v in full["state_dict"].items():
        assert torch.equal(v, cut["state_dict"][k]), k


def test_bf16_channels_last_and_compile_run_on_cpu(synthetic, tmp_path):
    """--compile with the CUDA-graph mode and an EMA (on a CPU: compiled, without CUDA graphs)."""
    fast = ("--precision", "bf16", "--memory-format", "channels_last")
    assert train.main(train_args(synthetic, tmp_path / "bf16", "--epochs", 1, *fast)) == 0
    assert train.main(train_args(synthetic, tmp_path / "compiled", "--epochs", 1, "--compile", "reduce-overhead",
                                 "--ema", 0.99)) == 0
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] == "reduce-overhead"
    for run in ("bf16", "compiled"):
        row = _history(tmp_path / run)[0]
        assert np.isfinite(float(row["train_loss"])) and float(row["valid_acc"]) > 0


def test_with_ema_best_pt_holds_the_average_it_was_chosen_on(synthetic, tmp_path):
    """--ema validates the averaged weights, so best.pt holds them; last.pt holds the raw weights and
    the average beside them, for --resume."""
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 1, "--ema", 0.9)) == 0
    best, last = (torch.load(tmp_path / "r" / name, weights_only=True) for name in ("best.pt", "last.pt"))
    average = last["ema"]["module"]
    assert best["state_dict"].keys() == average.keys()
    assert all(torch.equal(best["state_dict"][k], v) for k, v in average.items())
    assert not all(torch.equal(last["state_dict"][k], v) for k, v in average.items())


def test_benchmark_prints_every_precision_and_layout(monkeypatch, capsys):
    monkeypatch.setattr(train, "BENCHMARK_SECONDS", 0.05)
    rows = train.run(train.parse_args(["--benchmark", "--model", "lenet", "--batch-size", "8", "--device", "cpu"]))
    assert [(r["precision"], r["layout"]) for r in rows] == [("fp32", "contiguous"), ("fp32", "channels_last"),
                                                             ("bf16", "contiguous"), ("bf16", "channels_last")]
    assert all(r["bare"] > 0 and r["full"] > 0 and r["inference"] > 0 for r in rows)
    conv1, rest = 6 * 28 * 28 * 75, 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 6  # LeNet's multiply-adds
    # 2 FLOPs per multiply-add; backward is twice the forward, less conv1's gradient for the input images
    assert rows[0]["flops"] == pytest.approx(2 * (3 * (conv1 + rest) - conv1), rel=0.01)
    table = capsys.readouterr().out
    assert "full/bare" in table and "bf16" in table and "unknown: pass --peak-tflops" in table


def test_a_grouped_convolution_costs_three_forwards_to_train():
    """Forward, input gradient and weight gradient each cost 2 * N * H * W * C_out * C_in / groups * k^2
    FLOPs; torch.utils.flop_counter alone counts the weight gradient `groups` times over."""
    with torch.device("meta"):
        conv = nn.Conv2d(256, 256, 3, padding=1, groups=64, bias=False)
        x = torch.zeros(2, 256, 8, 8, requires_grad=True)
        y = torch.zeros(2, 8, 8, dtype=torch.long)
        forward = 2 * 2 * 8 * 8 * 256 * (256 // 64) * 3 * 3
        assert train.step_flops(conv, x, y) == 3 * forward
        with FlopCounterMode(display=False) as plain:
            F.cross_entropy(conv(x), y).backward()
    assert plain.get_total_flops() == (1 + 1 + 64) * forward  # what the share of peak used to be computed from


def test_resnext101_costs_three_times_its_31_gflop_forward_per_training_image():
    gflop = train.training_flops("resnext101_64x4d", 6, None, 2) / 1e9
    assert gflop == pytest.approx(93, rel=0.05), gflop  # 15.5 GMAC forward at 224 (torchvision), x 2 x 3


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 4090", 165.2), ("Tesla T4", None)])
def test_the_peak_table_matches_whole_names(name, peak):
    assert train.known_peak(name) == peak


def test_folds_trained_side_by_side_equal_folds_trained_in_turn(synthetic, tmp_path):
    """--jobs 2: the same five runs as --fold all in one process, history and weights, when both
    use as many CPU threads per fold (each job gets its share of the cores; a CPU kernel's rounding
    may depend on its thread count)."""
    args = ("--fold", "all", "--epochs", 2, "--augment", "trivial", "--mixup", 0.2, "--ema", 0.9)
    assert train.main(train_args(synthetic, tmp_path / "jobs", *args, "--jobs", 2)) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        assert train.main(train_args(synthetic, tmp_path / "turn", *args)) == 0
    finally:
        torch.set_num_threads(threads)
    for k in range(1, 6):
        one, two = (tmp_path / d / f"fold{k}" for d in ("jobs", "turn"))
        strip = lambda rows: [{c: v for c, v in r.items() if c not in ("epoch_s", "train_images_per_s")}  # noqa: E731
                              for r in rows]
        assert strip(_history(one)) == strip(_history(two)), k
        a, b = (torch.load(d / "best.pt", weights_only=True)["state_dict"] for d in (one, two))
        assert all(torch.equal(a[n], b[n]) for n in a), k
    assert (tmp_path / "jobs" / "summary.md").read_text() == (tmp_path / "turn" / "summary.md").read_text()
    proc = run_cli("train.py", *train_args(synthetic, tmp_path / "x", "--jobs", 2))
    assert_one_line_error(proc, "--jobs 2", "--fold all")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed KeyboardInterrupt
@pytest.mark.parametrize("script, step", [("train", "optimise"), ("simclr", "pretrain_step")])
def test_a_ctrl_c_a_finalizer_swallowed_still_stops_the_run_within_a_step(synthetic, tmp_path, monkeypatch, script,
                                                                          step):
    """Python runs a signal's handler wherever the main thread is, a `__del__` included (tqdm's), which
    drops what it raises: a run in one process went on to its end, or to a second Ctrl-C."""
    module, calls = __import__(script), []
    real = getattr(module, step)

    def a_step_during_which_a_finalizer_gets_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal_in_a_finalizer(signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, step, a_step_during_which_a_finalizer_gets_ctrl_c)
    with ctrl_c_as_from_a_terminal():
        proc = run_cli(f"{script}.py", *train_args(synthetic, tmp_path / "run", "--epochs", 3))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("interrupted: the same command with --resume continues")
    assert len(calls) == 2  # not a step more
    try:
        stop_if_asked()
    except KeyboardInterrupt:  # (raised as such, it would stop pytest itself)
        pytest.fail("the stop outlived its run: what this process runs next (a notebook's next cell) stops too")


def test_folds_side_by_side_stop_however_the_run_is_stopped(synthetic, tmp_path):
    """Three `--fold all --jobs 2` runs (at once: each is mostly torch imports), stopped once two folds train:
    - `kill -INT` of the parent alone (a terminal's Ctrl-C reaches the folds' processes too: the test
      below) stops the run within seconds (the pool would otherwise train the running folds to their
      end, and hand out the next), says how to go on, and leaves no process or temporary file;
    - `kill PID` (a scheduler's time limit, `timeout`) of a run started with `nohup ... &`: met as Ctrl-C
      is, the folds' processes stopped too (before, they went on training every remaining fold,
      orphaned, into a run directory no process held), one line, status 143, and --resume continues;
    - `kill -9`, which cannot pass anything on: its folds' processes stop themselves."""
    def stop(sig):
        out = tmp_path / sig.name
        start = start_as_from_a_terminal if sig == signal.SIGINT else start_in_the_background
        proc = start("train.py", *train_args(synthetic, out, "--fold", "all", "--jobs", 2, "--epochs", 100_000))
        lines = interrupt_when(proc, lambda: len(list(out.glob("fold*/best.pt"))) == 2, whole_group=False, sig=sig,
                               within=15)  # after kill -9 a fold's process looks for its parent each second
        assert not list(out.rglob("*.tmp")) and not list(out.glob("fold[345]/config.json")), sig  # none started after
        return proc.returncode, lines

    def go_on(sig):
        return f"the same command with --resume continues {tmp_path / sig.name} from its last saved epoch"
    interrupted, terminated, killed = at_once(stop, [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
    assert interrupted == (130, [f"interrupted: {go_on(signal.SIGINT)}"]), interrupted
    assert terminated == (143, [f"terminated: {go_on(signal.SIGTERM)}"]), terminated
    assert killed[0] == -signal.SIGKILL and "Traceback" not in "\n".join(killed[1]), killed  # the standard
    # library's resource tracker may say it cleans up the semaphores the killed process left: its job


def test_resume_with_other_flags_is_refused_before_any_fold_trains(trained_all, tmp_path, monkeypatch):
    """Side by side, a fold refused at its turn left the others training meanwhile (a fold without a
    last.pt starting afresh with the new flags: one run of two settings). Every fold is checked first."""
    run, started = tmp_path / "run", []
    shutil.copytree(trained_all, run)
    monkeypatch.setattr(train, "train_side_by_side", lambda *args: started.append(args) or [])
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    data = json.loads((run / "fold1" / "config.json").read_text())["data_root"]
    assert_one_line_error(run_cli("train.py", "--data-root", data, "--out", run, "--fold", "all", "--jobs", 2,
                                  "--epochs", 3, "--resume", "--device", "cpu"),
                          f"{run / 'fold1' / 'last.pt'}: --epochs was 2, now 3")
    assert not started
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


FOLD_PROCESS = """
import os, signal, sys, threading, time
import train
signal.signal(signal.SIGINT, signal.default_int_handler)  # as under a terminal, not `nohup ... &`
def fold(*args):  # stands in for fit_fold
    if sys.argv[1] == "during":
        try:
            os.kill(os.getpid(), signal.SIGINT)  # a terminal's Ctrl-C
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # and the parent's, passed on: must not cut the unwinding short
            print("unwound", flush=True)
    return {{}}
train.fit_fold = fold
stopped = threading.Event()
if sys.argv[1] == "starting":
    stopped.set()  # the run was stopped while this process imported torch, deaf to Ctrl-C
train._start_job(1, True, stopped, os.getppid())
train._fold_job({cfg}, 1, None, None)
if sys.argv[1] == "between":
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
print("still here", flush=True)
"""


def test_a_fold_process_leaves_quietly_on_ctrl_c_during_a_fold_or_between_two():
    """--jobs N's process for folds: Ctrl-C during a fold unwinds it (its files are cleaned up) and
    leaves; between folds (waiting for the next from the pool) it leaves at once; stopped while it
    started (deaf to Ctrl-C, importing torch) it leaves once ready; always with no traceback (the
    parent prints the one line) and without taking another fold. The three moments at once."""
    cfg = dict(device="cpu", precision="fp32", memory_format="contiguous", deterministic=False)
    moments = ["starting", "during", "between"]
    procs = at_once(lambda moment: subprocess.run([sys.executable, "-c", FOLD_PROCESS.format(cfg=cfg), moment],
                                                  cwd=REPO, text=True, capture_output=True, timeout=120), moments)
    for moment, proc in zip(moments, procs):
        assert proc.returncode == 130 and proc.stderr == "", (moment, proc.stderr[-2000:])
        assert proc.stdout == ("unwound\n" if moment == "during" else ""), moment


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(synthetic, tmp_path):
    assert_one_line_error(run_cli("train.py", "--data-root", synthetic, "--out", tmp_path / "r", "--device", "cuda"),
                          "--device cuda", "no CUDA device")
