import json

import pytest
import torch

import train
from conftest import assert_one_line_error, run_cli, train_args
from getData import index_split, patient_id
from models import build_model, checkpoint_dict, load_classifier, save_checkpoint, select_runtime
from testing import evaluate


# ----------------------------------------------------------------------------- aggregation
def test_averaging_identical_models_returns_the_model():
    state = build_model("resnet18", 6).state_dict()
    avg = train.average_states([state, state, state], [10, 3, 7])
    assert all(torch.allclose(avg[k].float(), v.float()) and avg[k].dtype == v.dtype for k, v in state.items())


def test_sample_weighting_is_exact():
    a = {"w": torch.tensor([1.0, -2.0]), "bn.running_mean": torch.tensor([0.0]),
         "bn.num_batches_tracked": torch.tensor(2)}
    b = {"w": torch.tensor([3.0, 2.0]), "bn.running_mean": torch.tensor([4.0]),
         "bn.num_batches_tracked": torch.tensor(6)}
    avg = train.average_states([a, b], [1, 3])  # 25% a, 75% b
    assert torch.equal(avg["w"], torch.tensor([2.5, 1.0]))
    assert torch.equal(avg["bn.running_mean"], torch.tensor([3.0]))  # buffers are averaged too
    assert avg["bn.num_batches_tracked"] == 5 and avg["bn.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_sites_cover_every_image_once_and_never_split_a_patient(synthetic, partition):
    samples = index_split(synthetic, 1, "Train")
    paths, targets = [p for p, _ in samples], torch.tensor([y for _, y in samples])
    sites = train.split_sites(paths, targets, 4, partition, 0.3, seed=0)
    flat = torch.cat(sites).tolist()
    assert sorted(flat) == list(range(len(paths)))
    owner = {}
    for s, idx in enumerate(sites):
        for i in idx.tolist():
            assert owner.setdefault(patient_id(paths[i]), s) == s
    if partition == "dirichlet":  # alpha 0.3: sites see skewed class mixes
        mixes = [torch.bincount(targets[idx], minlength=6).float() / max(len(idx), 1) for idx in sites if len(idx)]
        assert max(float((m - mixes[0]).abs().sum()) for m in mixes) > 0.3


def test_fedprox_with_mu_zero_equals_fedavg_and_writes_the_usual_outputs(synthetic, tmp_path):
    common = ["--rounds", 2, "--clients", 2, "--local-epochs", 1, "--batch-size", 8]
    assert train.main(train_args(synthetic, tmp_path / "avg", "--federated", "fedavg", *common)) == 0
    assert train.main(train_args(synthetic, tmp_path / "prox", "--federated", "fedprox", "--mu", 0, *common)) == 0
    assert train.main(train_args(synthetic, tmp_path / "prox1", "--federated", "fedprox", "--mu", 1.0, *common)) == 0
    avg, prox, prox1 = (torch.load(tmp_path / d / "last.pt", weights_only=True)["state_dict"]
                        for d in ("avg", "prox", "prox1"))
    assert all(torch.equal(avg[k], prox[k]) for k in avg)
    assert not all(torch.equal(avg[k], prox1[k]) for k in avg)  # the proximal term does act
    mixed = ("--mixup", 0.2, "--cutmix", 1.0, "--clip-grad", 0.5)  # the sites train with them (they were ignored)
    assert train.main(train_args(synthetic, tmp_path / "mix", "--federated", "fedavg", *common, *mixed)) == 0
    mix = torch.load(tmp_path / "mix" / "last.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(avg[k], mix[k]) for k in avg)
    assert {p.name for p in (tmp_path / "avg").iterdir()} >= {"config.json", "history.csv", "curves.png", "best.pt",
                                                              "last.pt"}
    assert len((tmp_path / "avg" / "history.csv").read_text().strip().splitlines()) == 1 + 2  # a row per round
    assert sum(json.loads((tmp_path / "avg" / "config.json").read_text())["site_sizes"]) == \
        len(index_split(synthetic, 1, "Train"))


def test_federated_bad_arguments(synthetic, tmp_path):
    base = ("train.py", "--data-root", synthetic, "--out", tmp_path / "f", "--federated", "fedprox")
    assert_one_line_error(run_cli(*base, "--clients", 500), "--clients 500", "patients")
    assert_one_line_error(run_cli(*base, "--mu", -1), "--mu -1")
    central = ("train.py", "--data-root", synthetic, "--out", tmp_path / "c")  # each was ignored without a word:
    for args, said in (((*base, "--ema", 0.9), "--ema 0.9 is not used by --federated runs"),  # a run of other settings
                       ((*base, "--epochs", 5), "--epochs 5 is not used by --federated runs"),
                       ((*base, "--compile"), "--compile default is not used by --federated runs"),
                       ((*central, "--rounds", 3), "--rounds 3 sets up a --federated run"),
                       ((*central, "--partition", "dirichlet"), "--partition dirichlet sets up a --federated run"),
                       ((*central, "--federated", "fedavg", "--mu", 0.1), "--mu 0.1 is FedProx's"),
                       ((*base, "--alpha", 0.1), "--alpha 0.1 shapes --partition dirichlet"),
                       ((*central, "--peak-tflops", 100), "--peak-tflops 100.0 is the benchmark's")):
        assert_one_line_error(run_cli(*args), said)
    assert not (tmp_path / "f").exists() and not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- SVM head
def test_svm_head_beats_chance_side_by_side(trained, tmp_path):
    result = evaluate(trained / "best.pt", tmp_path / "t", svm=True)
    svm, soft = result["svm"].metrics, result["softmax"].metrics
    support = [v["support"] for v in svm["per_class"].values()]
    assert svm["accuracy"] >= max(support) / sum(support) + 0.15
    assert svm["svm"]["kernel"] in ("linear", "rbf") and svm["svm"]["C"] > 0
    assert (tmp_path / "t" / "svm" / "metrics.json").is_file() and (tmp_path / "t" / "metrics.json").is_file()
    table = (tmp_path / "t" / "heads.md").read_text()
    assert "| metric | softmax | svm |" in table
    assert f"{svm['accuracy']:.4f}" in table and f"{soft['accuracy']:.4f}" in table


def test_svm_on_a_simclr_encoder(trained, synthetic, tmp_path):
    model, ckpt = load_classifier(trained / "best.pt", select_runtime("cpu"))
    encoder = tmp_path / "encoder.pt"
    save_checkpoint(checkpoint_dict(model, "encoder", ckpt["classes"], ckpt["config"], 1, {}), encoder)
    proc = run_cli("testing.py", "--checkpoint", encoder, "--svm", "--out", tmp_path / "e")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "e" / "svm" / "metrics.json").is_file() and not (tmp_path / "e" / "metrics.json").exists()
    assert_one_line_error(run_cli("testing.py", "--checkpoint", encoder), "--svm")
