"""Knowing when not to answer: the out-of-distribution scores, their gate, and where users meet them."""
import csv
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.covariance import LedoitWolf

import testing
import train
from conftest import assert_one_line_error, run_cli, serving, train_args
from getData import NOT_SKIN, MSLDDataset, index_split, list_classes, not_skin_images
from models import (GATE_SCORE, detection_metrics, fit_reference, gate, load_classifier, ood_scores,
                    reference_from_images, resize_size, select_runtime)
from models.ood import knn_distance, shrunk_covariance
from testing import evaluate


def _features(n, d=16, seed=0, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def test_knn_distance_is_the_kth_smallest_of_torch_cdist():
    bank, query = F.normalize(_features(200, seed=1), dim=1), _features(30, seed=2)
    for k in (1, 5, 50):
        direct = torch.cdist(F.normalize(query, dim=1), bank).kthvalue(k, dim=1).values
        assert torch.allclose(knn_distance(query, bank, k), direct, atol=1e-5), k


def test_shrunk_covariance_is_ledoit_wolf():
    x = _features(60, d=30, seed=3) @ torch.randn(30, 30, generator=torch.Generator().manual_seed(4))
    sklearn = torch.from_numpy(LedoitWolf().fit(x.numpy()).covariance_).double()
    assert torch.allclose(shrunk_covariance(x).double(), sklearn, rtol=1e-4, atol=1e-5)


def _layers(n, labels, seed, far_early=False):
    """Features of n images in two stages: "head" near the images' class centres; "early" near one centre
    for all, or, with far_early, pointing where no Train image points (what only an early stage sees)."""
    head = 3 * torch.eye(16)[:4][labels] + 0.5 * _features(n, seed=seed)
    early = 0.5 * _features(n, d=8, seed=seed + 100) + (4 * torch.eye(8)[7] if far_early else 0)
    return {"head": head, "backbone.early": early}


def test_the_gate_keeps_95_percent_of_valid_and_refuses_what_is_far():
    labels = torch.arange(400) % 4
    train_features, valid_features = (_layers(400, labels, seed=s) for s in (5, 6))
    logits = 4 * F.one_hot(labels, 4).float() + _features(400, d=4, seed=8)  # no two images score alike
    reference = fit_reference(train_features, labels, valid_features, logits)
    for name, threshold in reference["thresholds"].items():
        kept = (ood_scores(reference, valid_features, logits)[name] <= threshold).float().mean()
        assert 0.95 <= kept <= 0.95 + 1 / 400, name
    _, kept = gate(reference, valid_features, logits)
    assert kept.float().mean() >= 0.95
    far = dict(head=0.5 * _features(100, seed=7) - 3 * torch.eye(16)[8:].sum(0),  # pointing where no class points
               **{"backbone.early": _layers(100, labels[:100], seed=7)["backbone.early"]})
    assert gate(reference, far, torch.zeros(100, 4))[1].float().mean() < 0.05


def test_the_multilayer_score_flags_what_only_an_early_stage_sees():
    labels = torch.arange(400) % 4
    train_features, valid_features = (_layers(400, labels, seed=s) for s in (5, 6))
    reference = fit_reference(train_features, labels, valid_features, torch.zeros(400, 4))
    inside, early_only = (_layers(100, labels[:100], seed=9, far_early=far) for far in (False, True))
    scores = {k: ood_scores(reference, f, torch.zeros(100, 4)) for k, f in (("in", inside), ("out", early_only))}
    assert detection_metrics(scores["in"]["mahalanobis"], scores["out"]["mahalanobis"])["auroc"] < 0.7  # blind to it
    assert detection_metrics(scores["in"]["multilayer"], scores["out"]["multilayer"])["auroc"] > 0.99
    # each stage: the squared Mahalanobis distance to the nearest class mean under scikit-learn's Ledoit-Wolf
    # covariance of the class-centred Train features, in units of its distance that keeps 95% of Valid
    def distance(x, gaussian, means):
        return torch.from_numpy(np.stack([gaussian.mahalanobis((x - m).numpy()) for m in means])).amin(0)
    direct = []
    for name, features in train_features.items():
        means = torch.stack([features[labels == c].mean(0) for c in range(4)])
        gaussian = LedoitWolf(assume_centered=True).fit((features - means[labels]).numpy())
        direct.append(distance(early_only[name], gaussian, means)
                      / torch.quantile(distance(valid_features[name], gaussian, means), 0.95))
        if name == "head":  # the mahalanobis score: the last stage's distance, unscaled
            assert torch.allclose(scores["in"]["mahalanobis"].double(), distance(inside[name], gaussian, means),
                                  rtol=1e-3)
    assert torch.allclose(scores["out"]["multilayer"].double(), torch.stack(direct).amax(0), rtol=1e-3)


def test_energy_and_msp_are_their_formulas_with_the_calibrated_temperature_for_msp():
    labels = torch.arange(400) % 4
    train_features, valid_features = (_layers(400, labels, seed=s) for s in (5, 6))
    logits = 3 * _features(400, d=4, seed=10)
    scores = ood_scores(fit_reference(train_features, labels, valid_features, logits, temperature=2.0),
                        valid_features, logits)
    energy = -torch.tensor([np.log(np.exp(row).sum()) for row in logits.double().numpy()])  # Liu et al., T = 1
    assert torch.allclose(scores["energy"].double(), energy, atol=1e-5)
    assert torch.allclose(scores["msp"], -F.softmax(logits / 2.0, dim=1).max(1).values, atol=1e-6)


def test_detection_metrics_read_the_scores_the_right_way_round():
    inside, outside = torch.arange(100.0), torch.arange(100.0) + 1000
    m = detection_metrics(inside, outside)
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0
    m = detection_metrics(outside, inside)  # an inverted score is caught, not averaged away
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0
    assert detection_metrics(inside, inside)["auroc"] == pytest.approx(0.5)


def test_a_network_trained_on_the_synthetic_set_flags_noise_and_text_and_keeps_its_test_images(trained_resnet,
                                                                                                tmp_path):
    trained = trained_resnet
    stored = torch.load(trained / "best.pt", weights_only=True)["ood"]  # stored when best.pt was written
    assert set(stored["layers"]) == {"head", "backbone.layer2", "backbone.layer3"}  # layer4's pooled map is the head's
    m = evaluate(trained / "best.pt", tmp_path / "t", resamples=50)["softmax"].metrics["ood"]
    assert m["kinds"]["noise"]["knn"]["auroc"] > 0.95 and m["kinds"]["text"]["knn"]["auroc"] > 0.95, m["kinds"]
    assert m["sets"]["not_skin"]["knn"]["auroc"] > 0.8 and m["sets"]["not_skin"][GATE_SCORE]["auroc"] > 0.8
    assert m["gate"]["rejected_share"] < 0.25 and m["gate"]["n_kept"] > 0.75 * m["gate"]["n"]
    rows = list(csv.DictReader(open(tmp_path / "t" / "predictions.csv")))
    assert {"ood_score", "in_distribution"} <= set(rows[0]) and sum(r["in_distribution"] == "True" for r in rows) \
        == m["gate"]["n_kept"]
    report = (tmp_path / "t" / "report.md").read_text()
    assert "Out of distribution" in report and "| not_skin |" in report
    assert (tmp_path / "t" / "ood.png").read_bytes().startswith(b"\x89PNG")


def test_a_lenets_gate_reads_its_two_convolutions_and_flags_what_its_head_lets_through(trained, tmp_path):
    """LeNet's head reads fc2's 84 features, where noise lands among the skin photos (AUROC 0.5
    measured); the pooled maps of its two convolutions tell them apart (models/build.py, OOD_LAYERS)."""
    stored = torch.load(trained / "best.pt", weights_only=True)["ood"]
    assert set(stored["layers"]) == {"head", "backbone.relu1", "backbone.relu2"}
    m = evaluate(trained / "best.pt", tmp_path / "t", resamples=20)["softmax"].metrics["ood"]
    multilayer, head_only = (m["sets"]["not_skin"][s]["auroc"] for s in ("multilayer", "mahalanobis"))
    # measured: 0.86 against 0.75, and 0.85 on noise
    assert multilayer > head_only + 0.05 and m["kinds"]["noise"]["multilayer"]["auroc"] > 0.75, m["kinds"]


def test_best_pt_gets_its_reference_from_the_best_epochs_weights(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "is_better", lambda new, best: best is None)  # epoch 1 stays the best of 3
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 3)) == 0
    stored = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert stored["epoch"] == 1
    rt = select_runtime("cpu")
    model, _ = load_classifier(tmp_path / "r" / "best.pt", rt)
    train_set, valid_set = (MSLDDataset(synthetic, 1, split, cache_size=resize_size(model.input_size))
                            for split in ("Train", "Valid"))
    direct = reference_from_images(model, train_set.images, train_set.targets, valid_set.images,
                                   stored["temperature"], rt)
    for name, layer in stored["ood"]["layers"].items():
        assert torch.allclose(layer["class_means"], direct["layers"][name]["class_means"], atol=1e-5), name
    assert stored["ood"]["thresholds"] == pytest.approx(direct["thresholds"], rel=1e-4)


def test_excluding_a_class_trains_without_it_and_tests_it_as_near_ood(synthetic, tmp_path):
    out = tmp_path / "no-cowpox"
    assert train.main(train_args(synthetic, out, "--epochs", 2, "--exclude-class", "Cowpox")) == 0
    config = json.loads((out / "config.json").read_text())
    classes = [c for c in list_classes(synthetic) if c != "Cowpox"]
    assert config["classes"] == classes
    assert config["train_images"] == sum(1 for _, y in index_split(synthetic, 1, "Train") if y != 1)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["classes"] == classes and best["state_dict"]["head.weight"].shape[0] == 5
    m = evaluate(out / "best.pt", tmp_path / "t", resamples=50)["softmax"].metrics
    cowpox = {s: sum(1 for _, y in index_split(synthetic, 1, s) if y == 1) for s in ("Train", "Valid", "Test")}
    assert m["n"] == len(index_split(synthetic, 1, "Test")) - cowpox["Test"]
    assert m["ood"]["sets"]["near"]["knn"]["n_out"] == sum(cowpox.values())  # never seen: every split's photos
    test = [p for p, _ in index_split(synthetic, 1, "Test")]  # gradcam.py explains them too (it left them out)
    assert run_cli("gradcam.py", "--checkpoint", out, "--limit", len(test), "--out", tmp_path / "cam").returncode == 0
    assert {p.name for p in (tmp_path / "cam").glob("*_gradcam.png")} == {f"{p.stem}_gradcam.png" for p in test}
    assert_one_line_error(run_cli("train.py", *train_args(synthetic, tmp_path / "x", "--exclude-class", "Flu")),
                          "--exclude-class Flu", "Chickenpox")


def test_ood_dir_without_images_is_one_line(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    assert_one_line_error(run_cli("testing.py", "--checkpoint", trained / "best.pt", "--ood-dir", tmp_path / "empty",
                                  "--out", tmp_path / "t"), "--ood-dir", "no images", "it holds 1 .txt")
    for where, says in ((tmp_path / "empty" / "notes.txt", "a file, not a folder"), (tmp_path / "gone", "no such")):
        assert_one_line_error(run_cli("testing.py", "--checkpoint", trained / "best.pt", "--ood-dir", where,
                                      "--out", tmp_path / "t"), f"--ood-dir {where}: {says}")
    assert not (tmp_path / "t").exists()


def test_ood_dir_photos_are_scored(trained, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, (kind, im) in enumerate(not_skin_images(seed=9, per_kind=1)):
        im.save(folder / f"{i}-{kind}.png")
    for name in ("IMG_1.HEIC", "IMG_2.heic", "notes.txt", ".DS_Store"):  # what a phone's folder also holds
        (folder / name).write_bytes(b"")
    named_twice = [folder, tmp_path / "." / "mine"]  # each photo counts once
    m = evaluate(trained / "best.pt", tmp_path / "t", resamples=50, ood_dirs=named_twice)["softmax"].metrics["ood"]
    assert m["sets"]["ood_dir"]["knn"]["n_out"] == len(NOT_SKIN)
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: --ood-dir")]
    assert notes == [f"note: --ood-dir {d}: 2 .heic, 1 .txt left out, not being JPEG, PNG, WebP, BMP, TIFF or GIF "
                     "files" for d in named_twice]  # said once for each folder named


def test_a_broken_ood_dir_photo_is_one_line_before_the_evaluation(trained, tmp_path, monkeypatch):
    """It was found after the whole Test split had been evaluated."""
    folder = tmp_path / "mine"
    folder.mkdir()
    not_skin_images(seed=9, per_kind=1)[0][1].save(folder / "ok.png")
    (folder / "cut.jpg").write_bytes((folder / "ok.png").read_bytes()[:200])
    monkeypatch.setattr(testing, "evaluate_fold", lambda *a, **k: pytest.fail("evaluated before the refusal"))
    assert_one_line_error(run_cli("testing.py", "--checkpoint", trained, "--ood-dir", folder, "--out", tmp_path / "t"),
                          "cut.jpg: not a readable image")


def test_an_older_checkpoint_gets_its_reference_from_its_data_or_gates_as_it_can(trained, tmp_path, capsys):
    old = torch.load(trained / "best.pt", weights_only=True)
    del old["ood"]
    torch.save(old, tmp_path / "old.pt")
    m = evaluate(tmp_path / "old.pt", tmp_path / "t", resamples=50)["softmax"].metrics
    assert "computed from fold 1's Train and Valid images" in capsys.readouterr().out
    stored = evaluate(trained / "best.pt", tmp_path / "t2", resamples=50)["softmax"].metrics
    assert m["ood"]["gate"] == stored["ood"]["gate"]  # the same reference, computed again
    outdated = torch.load(trained / "best.pt", weights_only=True)
    del outdated["ood"]["thresholds"]["multilayer"]  # as written before that score existed
    torch.save(outdated, tmp_path / "outdated.pt")
    m = evaluate(tmp_path / "outdated.pt", tmp_path / "t3", resamples=50)["softmax"].metrics
    assert "computed from fold 1's" in capsys.readouterr().out and m["ood"]["gate"] == stored["ood"]["gate"]
    head_only = torch.load(trained / "best.pt", weights_only=True)
    for stage in ("backbone.relu1", "backbone.relu2"):  # as written before LeNet's gate read its convolutions
        del head_only["ood"]["layers"][stage]
    torch.save(head_only, tmp_path / "head_only.pt")
    m = evaluate(tmp_path / "head_only.pt", tmp_path / "t4", resamples=50)["softmax"].metrics
    assert "older than this version's scores: computed from fold 1's" in capsys.readouterr().out
    assert m["ood"]["gate"] == stored["ood"]["gate"]
    foreign = torch.load(trained / "best.pt", weights_only=True)
    foreign["ood"]["layers"]["backbone.fc1"] = foreign["ood"]["layers"]["head"]  # a stage this network does not read
    malformed = torch.load(trained / "best.pt", weights_only=True)
    malformed["ood"].update(layers=5, thresholds=5)  # edited by hand: not a reference at all
    import serve
    for ckpt, gates in ((old, "no OOD gate"), (head_only, "the stored one gates"), (foreign, "no OOD gate"),
                        (malformed, "no OOD gate")):
        ckpt["config"]["data_root"] = str(tmp_path / "gone")
        torch.save(ckpt, tmp_path / "orphan.pt")
        with serve.Predictor(tmp_path / "orphan.pt", select_runtime("cpu")) as predictor:
            assert f"its data is not at hand: {gates}" in capsys.readouterr().out
            assert (predictor.info["ood"] is None) == (gates == "no OOD gate")


def test_ood_score_chooses_the_gate_in_testing_and_serve(trained, tmp_path):
    stored = torch.load(trained / "best.pt", weights_only=True)["ood"]
    for score in ("knn", "msp"):
        m = evaluate(trained / "best.pt", tmp_path / score, resamples=50, ood_score=score)["softmax"].metrics["ood"]
        assert m["score"] == score and m["threshold"] == stored["thresholds"][score]
        rows = list(csv.DictReader(open(tmp_path / score / "predictions.csv")))
        kept = [float(r["ood_score"]) <= stored["thresholds"][score] for r in rows]
        assert [r["in_distribution"] == "True" for r in rows] == kept and sum(kept) == m["gate"]["n_kept"]
    import serve
    for asked, score in (("knn", "knn"), (None, stored["score"])):
        with serve.Predictor(trained / "best.pt", select_runtime("cpu"), ood_score=asked) as predictor:
            info = predictor.info["ood"]
        assert info["score"] == score and info["threshold"] == stored["thresholds"][score]
    assert_one_line_error(run_cli("testing.py", "--checkpoint", trained / "best.pt", "--ood-score", "distance"),
                          "--ood-score", "knn")


def test_gradcam_marks_the_photos_the_gate_turns_away(trained_resnet, synthetic, tmp_path, monkeypatch):
    import gradcam
    gated_on = []  # the score each gate call used: --ood-score must reach it
    monkeypatch.setattr(gradcam, "gate", lambda ref, *a: gated_on.append(ref["score"]) or gate(ref, *a))
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(noise)
    lesions = sorted(synthetic.glob("fold1/Test/*/*.jpg"))[:8]
    for score in (None, "knn"):
        args = ["--checkpoint", str(trained_resnet / "best.pt"), str(noise), *map(str, lesions),
                "--out", str(tmp_path / f"cam-{score}")] + (["--ood-score", score] if score else [])
        gated_on.clear()
        results = gradcam.run(gradcam.parse_args(args))
        assert set(gated_on) == {score or GATE_SCORE}
        assert results[0].in_distribution is False and sum(e.in_distribution for e in results[1:]) >= 6, score
        assert gradcam._caption(results[0], ["a"] * 6).startswith("OOD") and "OOD" not in \
            gradcam._caption(next(e for e in results if e.in_distribution), ["a"] * 6)
        assert (tmp_path / f"cam-{score}" / "grid.png").is_file()


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_predict_withholds_the_label_of_a_noise_image(trained_resnet, synthetic):
    import serve
    from test_serve import predict
    predictor = serve.Predictor(trained_resnet / "best.pt", select_runtime("cpu"))
    with serving(serve.make_server(predictor)) as srv:
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
        status, a = predict(srv, _png(noise), "image/png", "?gradcam=1")
        assert status == 200 and a["in_distribution"] is False and a["label"] is None and "reason" in a
        assert a["ood_score"] > predictor.info["ood"]["threshold"] and "gradcam_png" not in a
        assert sum(a["probabilities"].values()) == pytest.approx(1, abs=1e-4)  # kept for the curious
        kept = [predict(srv, p.read_bytes())[1] for p in sorted(synthetic.glob("fold1/Test/*/*.jpg"))[:20]]
        assert sum(k["in_distribution"] for k in kept) >= 15 and all(k["label"] for k in kept if k["in_distribution"])
        status, info = __import__("test_serve").request(srv, "GET", "/info")
        assert info["ood"]["score"] == GATE_SCORE and info["ood"]["keeps_of_valid"] == 0.95


@pytest.mark.skipif(not __import__("test_serve")._chromium(), reason="no Chromium installed (apt-get install chromium)")
def test_the_page_gives_no_diagnosis_for_a_photo_unlike_the_training_photos(trained_resnet, tmp_path):
    import serve
    from test_serve import upload_in_browser
    predictor = serve.Predictor(trained_resnet / "best.pt", select_runtime("cpu"))
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(noise)
    with serving(serve.make_server(predictor)) as srv:
        state = upload_in_browser(srv, noise, tmp_path / "profile")
    assert state["shown"] and not state["error"], state
    assert state["label"] == "No diagnosis" and state["ood"], state  # the plain words, no class named
    assert state["barsFolded"] and state["folded"] and not state["camShown"]  # probabilities only on request
    assert "no diagnosis" in state["facts"]
