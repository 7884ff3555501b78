import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

import train
from conftest import REPO, assert_one_line_error, run_script, train_args
from getData import list_classes
from models import ModelError, build_model, checkpoint_dict, save_checkpoint, warmup_cosine
from testing import evaluate


def _history(out):
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


def test_training_beats_chance_on_test(trained, tmp_path):
    m = evaluate(trained / "best.pt", tmp_path / "test")["softmax"]
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
    assert {"optimizer", "scheduler", "rng", "history"} <= set(last) and last["epoch"] == 40
    assert best["metric"]["valid_bal_acc"] == max(float(r["valid_bal_acc"]) for r in _history(trained))
    assert not any(k.startswith("module.") or k.startswith("_orig_mod") for k in best["state_dict"])


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
    args = ["--epochs", 4, "--batch-size", 16, "--balance", "sampler", "--model", "lenet"]
    assert train.main(train_args(synthetic, tmp_path / "full", *args)) == 0

    calls = {"n": 0}
    real_validate = train.validate

    def killed_in_epoch_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process dies before epoch 3 is saved
        return real_validate(*a, **k)
    monkeypatch.setattr(train, "validate", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(synthetic, tmp_path / "cut", *args))
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(train, "validate", real_validate)
    assert train.main(train_args(synthetic, tmp_path / "cut", *args, "--resume")) == 0

    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k, v in full["state_dict"].items():
        assert torch.equal(v, cut["state_dict"][k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_s", "train_images_per_s")} for r in rows]
    assert strip(_history(tmp_path / "full")) == strip(_history(tmp_path / "cut"))


def test_resume_refuses_changed_arguments(synthetic, tmp_path):
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 1)) == 0
    with pytest.raises(ModelError, match="--lr was 0.002, now 0.1"):
        train.run(train.parse_args(train_args(synthetic, tmp_path / "r", "--epochs", 1, "--lr", 0.1, "--resume")))


def test_fold_all_writes_summary(trained_all):
    summary = (trained_all / "summary.md").read_text()
    assert all((trained_all / f"fold{k}" / "best.pt").is_file() for k in range(1, 6))
    assert "mean ± std" in summary and all(f"| {k} |" in summary for k in range(1, 6))


def test_ddp_two_gloo_processes_match_one_process(synthetic, tmp_path):
    common = ["--epochs", 1, "--batch-size", 16, "--no-augment", "--device", "cpu"]
    single = run_script("train.py", "--data-root", synthetic, "--out", tmp_path / "one", *common)
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
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


def test_main_job_falls_back_to_synthetic_data(tmp_path):
    proc = run_script(REPO / "train.py", "--epochs", 1, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no MSLD v2.0 found under data/" in proc.stdout
    assert (tmp_path / "data" / "synthetic" / "SYNTHETIC.txt").is_file()
    assert (tmp_path / "runs" / "lenet-fold1" / "best.pt").is_file()


def test_bad_arguments_are_one_line_errors(synthetic, tmp_path):
    base = ("train.py", "--data-root", synthetic, "--out", tmp_path / "r", "--epochs", "1")
    assert_one_line_error(run_script("train.py", "--data-root", tmp_path / "missing"), "no such folder")
    assert_one_line_error(run_script(*base, "--model", "resnet19"), "unknown or unsupported model")
    assert_one_line_error(run_script(*base, "--fold", "7"), "--fold 7")
    lenet = tmp_path / "lenet.pt"
    save_checkpoint(checkpoint_dict(build_model("lenet", 6), "classifier", list_classes(synthetic), {}, 1, {}), lenet)
    assert_one_line_error(run_script(*base, "--model", "resnet18", "--init", lenet), "checkpoint is for lenet")
    assert not (tmp_path / "r" / "best.pt").exists()


def test_balancing_helpers():
    targets = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    w = train.class_weights(targets, 3)
    assert w[2] > w[1] > w[0] and w.mean() == pytest.approx(1.0)
    draws = torch.multinomial(w[targets], 30000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = torch.bincount(targets[draws], minlength=3) / 30000.0
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.02)  # the sampler balances classes
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.0)
