import json
import re
import shutil
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from conftest import assert_one_line_error, drawn, killed_on_call, run_cli
from getData import MSLDDataset, index_split
from models import ModelError, drawable, mean_std_table, resize_size
import testing
from testing import (CI_KEYS, bootstrap, calibration_bins, classification_metrics, confusion_matrix,
                     confusion_metrics, evaluate, gated_metrics, interval, mpox_operating_point, risk_coverage)

CLASSES = ["Chickenpox", "Cowpox", "HFMD", "Healthy", "Measles", "Monkeypox"]


def _hand_made(seed=0, n=60):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, n)
    logits = rng.normal(0, 1, (n, 6))
    logits[np.arange(n), y] += 1.5  # mostly right
    logits[:, 1] -= 10  # Cowpox is never predicted
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_metrics_match_scikit_learn_including_a_never_predicted_class():
    y, probs = _hand_made()
    pred = probs.argmax(1)
    assert 1 not in pred and 1 in y
    m = classification_metrics(y, probs, CLASSES)
    labels = list(range(6))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx((p, r, f))
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    cm = skm.confusion_matrix(y, pred, labels=labels)
    assert m["confusion"] == cm.tolist()
    for c, name in enumerate(CLASSES):
        tn = cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]
        assert m["per_class"][name]["specificity"] == pytest.approx(tn / (cm.sum() - cm[c].sum()))
    mpox = y == 5
    assert m["mpox_sensitivity"] == pytest.approx(skm.recall_score(mpox, pred == 5))
    assert m["mpox_specificity"] == pytest.approx(skm.recall_score(~mpox, pred != 5))
    assert m["per_class"]["Cowpox"]["precision"] == 0 and m["per_class"]["Cowpox"]["recall"] == 0


def test_balanced_accuracy_averages_the_classes_present_as_scikit_learn_does():
    """Three of six classes in the Test split (a subset, or a class left out): the recall of a class with
    no image is no score, and balanced accuracy is over the three (also when an absent class is predicted)."""
    y, pred = np.array([1, 1, 2, 2, 3, 3]), np.array([1, 0, 2, 2, 3, 1])
    m = classification_metrics(y, np.eye(6)[pred], CLASSES)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred)) == (0.5 + 1 + 0.5) / 3


def test_confidence_gate_coverage_and_covered_metrics():
    y, probs = _hand_made(1)
    g = gated_metrics(y, probs, CLASSES, 0.6)
    covered = probs.max(1) >= 0.6
    assert g["coverage"] == pytest.approx(covered.mean()) and 0 < g["coverage"] < 1
    assert g["accuracy"] == pytest.approx(skm.accuracy_score(y[covered], probs[covered].argmax(1)))
    assert gated_metrics(y, probs, CLASSES, 1.01)["n_covered"] == 0
    at = np.array([[0.6, 0.4, 0, 0, 0, 0]])  # the gate answers a top probability that reaches it, as serve.py does
    assert gated_metrics([0], at, CLASSES, 0.6)["n_covered"] == 1


def test_mean_std_table():
    rows = [{"fold": 1, "accuracy": 0.5, "best_epoch": 3}, {"fold": 2, "accuracy": 0.7, "best_epoch": 4}]
    table = mean_std_table(rows, ["accuracy", "best_epoch"])
    assert "| 2 | 0.7000 | 4 |" in table and "| 0.6000 ± 0.1414 | 3.5000 ± 0.7071 |" in table  # sample std, ddof=1
    rows.append({"fold": 3, "best_epoch": 5})  # a fold without the figure: a dash, and the mean says over which
    table = mean_std_table(rows, ["accuracy", "best_epoch"])
    assert "| 3 | — | 5 |" in table and "| 0.6000 ± 0.1414 (2 of 3) | 4.0000 ± 1.0000 |" in table


@pytest.mark.figures
def test_class_names_the_font_cannot_draw_stay_apart_in_the_figures(tmp_path):
    """Class folders named in Chinese were drawn as rows of the same empty boxes (two classes, one
    label), with a warning per glyph; a `$` started matplotlib's maths. Each is written as it can be
    drawn, and the confusion matrix and ROC draw without a missing-glyph warning."""
    classes = ["水痘", "麻疹", "🦠Cowpox", "Оспа", "Mpox $5"]
    shown = [drawable(c) for c in classes]
    assert shown[2:] == ["[U+1F9A0]Cowpox", "Оспа", "Mpox \\$5"] and len(set(shown)) == len(classes)
    y = np.arange(10) % 5
    probs = np.eye(5)[(y + (np.arange(10) > 6)) % 5] * 0.8 + 0.04
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph 27700 missing from font(s) DejaVu Sans"
        testing.plot_confusion(confusion_matrix(y, probs.argmax(1), 5), classes, tmp_path / "cm.png")
        testing.plot_roc(y, probs, classes, tmp_path / "roc.png")
    assert drawn(tmp_path / "cm.png") and drawn(tmp_path / "roc.png")


def test_evaluate_fold_all_run_writes_every_output(trained_all, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli("testing.py", "--checkpoint", trained_all, "--out", out, "--threshold", "0.3")
    assert proc.returncode == 0, proc.stderr
    for k in range(1, 6):
        d = out / f"fold{k}"
        assert all((d / f).stat().st_size > 0 for f in ("metrics.json", "predictions.csv", "report.md",
                                                        "confusion.png", "roc.png"))
        m = json.loads((d / "metrics.json").read_text())
        rows = (d / "predictions.csv").read_text().strip().splitlines()
        assert len(rows) == m["n"] + 1 and rows[0].startswith("file,true,predicted,p_Chickenpox")
        assert m["split"] == "Test" and m["fold"] == k and m["gated"]["threshold"] == 0.3
        report = (d / "report.md").read_text()  # a gate that covers no image: a dash, not 'nan' (2 epochs: none at 0.9)
        assert "| 0.9 | 0.000 | — |" in report and not re.search(r"\bnan\b", report), report
    assert proc.stdout.splitlines()[-1] == f"wrote summary.md and each fold's report, metrics, predictions and " \
                                           f"figures to {out}/"  # where to look, as the other scripts say
    config = json.loads((out / "config.json").read_text())  # what made these outputs
    assert config["threshold"] == 0.3 and config["checkpoint"] == [str(trained_all)] and config["out"] == str(out)
    summary = (out / "summary.md").read_text()
    assert "mean ± std" in summary and summary.count("\n| ") >= 6
    assert "95% CI of the 5-fold mean" in summary and "distinct images" in summary
    folds = [json.loads((out / f"fold{k}" / "metrics.json").read_text()) for k in range(1, 6)]
    noise = np.mean([m["ood"]["kinds"]["noise"]["knn"]["auroc"] for m in folds])
    kinds_row = next(line for line in summary.splitlines() if line.startswith("| knn | ") and "±" not in line)
    assert kinds_row.split(" | ")[1] == f"{noise:.2f}"  # by kind of non-skin picture: the mean over folds
    m = json.loads((out / "fold1" / "metrics.json").read_text())
    assert {"ece", "ece_raw", "temperature", "ci95", "risk_coverage", "mpox_operating_point"} <= set(m)
    low, high = m["ci95"]["accuracy"]
    assert low <= m["accuracy"] <= high
    rows = list(__import__("csv").DictReader(open(out / "fold1" / "predictions.csv")))
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])  # the calibrated probabilities
    y = np.array([CLASSES.index(r["true"]) for r in rows])
    assert calibration_bins(y, probs)[0] == pytest.approx(m["ece"], abs=1e-4)
    assert {p.name for p in (out / "fold1").glob("*.png")} == FOLD_FIGURES  # drawn: the test below
    numbers = json.loads((out / "summary.json").read_text())
    assert numbers["distinct"]["n"] == numbers["distinct"]["entries"]  # the synthetic Test sets are disjoint
    assert {p.name for p in out.glob("*.png")} == {"confusion_pooled.png", "reliability_pooled.png"}
    pooled = json.loads((out / "summary.json").read_text())["pooled_confusion"]
    assert np.sum(pooled) == sum(json.loads((out / f"fold{k}" / "metrics.json").read_text())["n"] for k in range(1, 6))


FOLD_FIGURES = {"confusion.png", "roc.png", "reliability.png", "risk_coverage.png", "ood.png"}


@pytest.mark.figures
def test_a_folds_figures_are_drawn(trained, tmp_path):
    """One fold's: a --fold all run draws them with the same functions for each fold, and its pooled
    confusion matrix and reliability diagram with the fold's two."""
    evaluate(trained / "best.pt", tmp_path / "t", resamples=10)
    figures = {p.name for p in (tmp_path / "t").glob("*.png")}
    assert figures == FOLD_FIGURES and all(drawn(tmp_path / "t" / name) for name in figures), figures


def test_calibration_changes_confidence_not_answers(trained, tmp_path, capsys):
    from models import load_classifier, predict, select_runtime
    r = evaluate(trained / "best.pt", tmp_path / "t", resamples=20)["softmax"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("# lenet fold 1 Test, softmax head") and printed[-1] == \
        f"wrote report.md, metrics.json, predictions.csv and the figures to {tmp_path / 't'}/"
    model, ckpt = load_classifier(trained / "best.pt", select_runtime("cpu"))
    ds = MSLDDataset(ckpt["config"]["data_root"], 1, "Test", cache_size=resize_size(32))
    raw = predict(model, ds.images, select_runtime("cpu")).numpy()
    assert ckpt["temperature"] != 1 and not np.allclose(raw, r.probs, atol=1e-3)  # the probabilities moved...
    assert np.array_equal(raw.argmax(1), r.probs.argmax(1))  # ...the answers did not
    assert r.metrics["accuracy"] == pytest.approx((raw.argmax(1) == ds.targets.numpy()).mean())
    assert r.metrics["ece"] != r.metrics["ece_raw"]


def test_tta_averages_eight_views_with_a_temperature_fitted_for_them(trained, tmp_path):
    from models import TTA_VIEWS, fit_temperature, load_classifier, predict_logits, probabilities, select_runtime
    r = evaluate(trained / "best.pt", tmp_path / "t", tta=True, resamples=20)["softmax"]
    rt = select_runtime("cpu")
    model, ckpt = load_classifier(trained / "best.pt", rt)
    valid, test = (MSLDDataset(ckpt["config"]["data_root"], 1, split, cache_size=resize_size(32))
                   for split in ("Valid", "Test"))
    t = fit_temperature(predict_logits(model, valid.images, rt, views=TTA_VIEWS), valid.targets)
    assert len(TTA_VIEWS) == 8 and t != ckpt["temperature"] and r.metrics["temperature"] == pytest.approx(t)
    assert np.allclose(r.probs, probabilities(predict_logits(model, test.images, rt, views=TTA_VIEWS), t), atol=1e-6)


def test_an_ensemble_averages_its_members(trained_all, tmp_path):
    single = evaluate(trained_all / "fold2" / "best.pt", tmp_path / "one", resamples=20)["softmax"]
    copy = shutil.copytree(trained_all, tmp_path / "copy")  # the same weights in other files
    twice = evaluate([trained_all, copy], tmp_path / "two", resamples=20)  # every fold, two members
    assert np.allclose(twice[2]["softmax"].probs, single.probs, atol=1e-6)  # the mean of equal members
    m = twice[2]["softmax"].metrics
    assert m["members"] == 2 and len(m["checkpoint"]) == 2
    assert "ensemble" in (tmp_path / "two" / "summary.md").read_text()
    temperatures = m["temperature"]  # one per member, each in the report (not the list's repr)
    assert len(temperatures) == 2 and f"temperature {temperatures[0]:.4f}, {temperatures[1]:.4f})" in \
        (tmp_path / "two" / "fold2" / "report.md").read_text()
    assert testing.parse_args(["--checkpoint", "a", "b", "--checkpoint", "c"]).checkpoint == ["a", "b", "c"]
    with pytest.raises(Exception, match="not both"):
        evaluate([trained_all, trained_all / "fold1" / "best.pt"], tmp_path / "mixed")
    fold2 = trained_all / "fold2"
    for members in ([trained_all, trained_all], [fold2, fold2 / "." / "best.pt"]):  # one network, named twice
        with pytest.raises(ModelError, match=r"names \S+/best.pt again \(as --checkpoint .*give each network of an"):
            evaluate(members, tmp_path / "repeated")
    assert not (tmp_path / "repeated").exists()


def test_a_run_with_folds_missing_says_which_folds_it_is_summed_over_and_fold_picks_one(trained_all, tmp_path, capsys):
    partial, other = tmp_path / "partial", tmp_path / "other"
    shutil.copytree(trained_all / "fold2", partial / "fold2")
    shutil.copytree(trained_all / "fold3", other / "fold3")
    (partial / "fold4").mkdir()  # a fold that had begun: no best.pt yet
    assert set(evaluate(partial, tmp_path / "t", resamples=20)) == {2}
    assert "no best.pt for fold1, fold3, fold4, fold5" in capsys.readouterr().out
    assert (tmp_path / "t" / "summary.md").read_text().startswith("# partial: 1 fold (fold2 only)")
    with pytest.raises(ModelError, match="no fold has a best.pt in every run"):
        evaluate([partial, other], tmp_path / "u")
    assert set(evaluate(trained_all, tmp_path / "v", resamples=20, fold=3)) == {3}  # --fold K: that fold alone
    with pytest.raises(ModelError, match="--fold 1: no best.pt for it"):
        evaluate(partial, tmp_path / "w", fold=1)


def test_photos_the_network_trained_on_are_counted_and_noted(synthetic, trained, tmp_path, capsys):
    """MSLD's folds are partitions of one set of photos: another fold's Test split holds photos of
    this network's Train split. Evaluated there, it says how many."""
    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    for p, _ in index_split(data, 1, "Train")[:3]:  # three of fold 1's Train photos, also in fold 2's Test
        shutil.copy(p, data / "fold2" / "Test" / p.parent.name / p.name)
    own = evaluate(trained / "best.pt", tmp_path / "own", resamples=20, data_root=data)["softmax"]
    other = evaluate(trained / "best.pt", tmp_path / "other", resamples=20, data_root=data, fold=2)["softmax"]
    assert own.metrics["seen_in_training"] == 0 and other.metrics["seen_in_training"] == 3
    assert "note: 3 of the" in capsys.readouterr().out


def test_testing_bad_input_is_one_line(tmp_path, trained_all):
    (tmp_path / "x.pt").write_text("not a checkpoint")
    assert_one_line_error(run_cli("testing.py", "--checkpoint", tmp_path / "x.pt"), "not a PyTorch checkpoint")
    assert_one_line_error(run_cli("testing.py", "--checkpoint", tmp_path / "nothing"), "no such")
    assert_one_line_error(run_cli("testing.py", "--checkpoint", trained_all / "fold1" / "best.pt",
                                     "--data-root", tmp_path), "no MSLD v2.0 layout")


# ----------------------------------------------------------------------------- trust
def _calibrated(n, seed, overconfident=False):
    """Predictions whose top probability is the chance of being right (or far above it)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, n)
    conf = rng.uniform(0.2, 1.0, n)
    right = rng.random(n) < (conf if not overconfident else conf * 0.6)
    pred = np.where(right, y, (y + rng.integers(1, 6, n)) % 6)
    probs = np.tile(((1 - conf) / 5)[:, None], (1, 6))
    probs[np.arange(n), pred] = conf
    return y, probs


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    y, probs = _calibrated(20000, 0)
    ece, bins = calibration_bins(y, probs)
    assert ece < 0.02 and sum(b["n"] for b in bins) == 20000 and len(bins) == 15
    y, probs = _calibrated(20000, 0, overconfident=True)
    assert calibration_bins(y, probs)[0] > 0.2


def test_bootstrap_intervals_contain_the_estimate_and_narrow_with_more_patients():
    widths = []
    for patients in (30, 600):
        y, probs = _calibrated(2 * patients, patients)
        groups = np.repeat(np.arange(patients), 2)  # two photos per patient
        samples = bootstrap(y, probs, groups, 6, 5, 1000, seed=0)
        ci = interval(samples)
        m = classification_metrics(y, probs, CLASSES)
        for k in CI_KEYS:
            assert ci[k][0] <= m[k] <= ci[k][1], (k, ci[k], m[k])
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
        assert np.allclose(bootstrap(y, probs, groups, 6, 5, 50, seed=1), bootstrap(y, probs, groups, 6, 5, 50, seed=1))
    assert widths[1] < widths[0] / 2  # 20 times the patients: about 4.5 times narrower
    with warnings.catch_warnings():  # a network trained without Mpox: its sensitivity has no interval, and no
        warnings.simplefilter("error")  # "All-NaN slice" warning reaches the user's console
        ci = interval(bootstrap(y, probs, groups, 6, None, 50, seed=0))
    assert set(ci) == set(CI_KEYS) - {"mpox_sensitivity"}


def test_bootstrap_draws_whole_patients():
    """Four photos per patient, right or wrong together (one lesion, photographed four times): drawn by
    patient, 30 patients are 30 observations, not 120, and the interval is about twice as wide."""
    rng = np.random.default_rng(0)
    right = np.repeat(rng.random(30) < 0.6, 4)
    y = np.repeat(rng.integers(0, 6, 30), 4)
    probs = np.eye(6)[np.where(right, y, (y + 1) % 6)]
    width = {}
    for unit, groups in (("patient", np.repeat(np.arange(30), 4)), ("photo", np.arange(120))):
        ci = interval(bootstrap(y, probs, groups, 6, 5, 2000, seed=0))
        width[unit] = ci["accuracy"][1] - ci["accuracy"][0]
    assert width["patient"] > 1.6 * width["photo"], width


def test_batched_confusion_metrics_equal_one_at_a_time():
    rng = np.random.default_rng(0)
    cms = rng.integers(0, 9, (5, 6, 6))
    batched = confusion_metrics(cms, 5)
    for i, cm in enumerate(cms):
        one = confusion_metrics(cm, 5)
        for k in ("accuracy", "balanced_accuracy", "f1_macro", "mpox_sensitivity"):
            assert batched[k][i] == pytest.approx(one[k])
    y, probs = _hand_made()
    m = confusion_metrics(confusion_matrix(y, probs.argmax(1), 6), 5)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, probs.argmax(1)))


def test_risk_coverage_and_the_mpox_operating_point():
    y, probs = _hand_made(2, 200)
    coverage, accuracy = risk_coverage(y, probs)
    assert coverage[-1] == 1 and accuracy[-1] == pytest.approx((probs.argmax(1) == y).mean())
    y, probs = _calibrated(4000, 3)
    coverage, accuracy = risk_coverage(y, probs)
    assert accuracy[int(0.2 * len(y))] > accuracy[-1] + 0.15  # the confident fifth is more often right
    valid_y, valid_p = _calibrated(500, 4)
    op = mpox_operating_point(valid_y, valid_p, y, probs, positive=5)
    assert op["valid_sensitivity"] >= 0.95
    assert np.mean(valid_p[valid_y == 5, 5] >= op["threshold"] + 1e-9) < 0.95  # the highest such threshold
    t = op["threshold"]
    assert op["test_sensitivity"] == pytest.approx(np.mean(probs[y == 5, 5] >= t))
    assert op["test_specificity"] == pytest.approx(np.mean(probs[y != 5, 5] < t))
    same = mpox_operating_point(valid_y, valid_p, valid_y, valid_p, positive=5)  # Mpox at p >= t on Test as on
    assert same["test_sensitivity"] == same["valid_sensitivity"]  # Valid: the photo that set t is called Mpox too


def test_a_95_percent_interval_is_as_wide_as_the_binomials():
    """One photo per patient, 70% of them right: the bootstrap's 95% interval of the accuracy is the
    binomial's, 2 x 1.96 x sqrt(p(1 - p) / n) wide (a 90% interval is 16% narrower)."""
    n, rng = 400, np.random.default_rng(0)
    y, right = rng.integers(0, 6, n), rng.random(n) < 0.7
    low, high = interval(bootstrap(y, np.eye(6)[np.where(right, y, (y + 1) % 6)], np.arange(n), 6, 5, 4000,
                                   seed=0))["accuracy"]
    p = right.mean()
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.06)


def test_a_run_trained_from_a_relative_data_root_is_evaluated_from_any_folder(synthetic, tmp_path):
    """The run recorded --data-root as typed: `--data-root mydata` in one folder, then testing.py from
    another, said `mydata: no such folder`. It records the dataset's absolute path."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mydata").symlink_to(synthetic)
    args = ["--data-root", "mydata", "--out", "run", "--epochs", 1, "--device", "cpu"]
    assert run_cli("train.py", *args, cwd=work).returncode == 0
    proc = run_cli("testing.py", "--checkpoint", work / "run", "--out", tmp_path / "t", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((work / "run" / "config.json").read_text())["data_root"] == str(work / "mydata")


def test_data_with_other_classes_is_one_line_that_names_the_data_it_trained_on(trained, synthetic, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(synthetic, other)
    for split in other.glob("fold*/*"):
        shutil.copytree(split / "Cowpox", split / "Extra")
    proc = run_cli("testing.py", "--checkpoint", trained, "--data-root", other, "--out", tmp_path / "t")
    assert_one_line_error(proc, "differ from the checkpoint's", f"evaluate it on the data it trained on (--data-root "
                          f"{synthetic})")
    assert not (tmp_path / "t").exists()


def test_a_gate_that_keeps_no_image_reads_as_such_not_as_nan():
    """A network whose gate turns every Test image away: 'accuracy on the 0 it keeps nan', and 'nan ± nan'
    over the folds."""
    by_score = {s: dict(auroc=0.5, fpr95=1.0, n_out=8, n_in=5) for s in testing.SCORES}
    ood = dict(score="knn", threshold=0.3, gate=dict(rejected_share=1.0, n_kept=0, n=5), sets={"not_skin": by_score},
               kinds={"noise": by_score})
    text = testing.ood_markdown(ood) + testing.ood_summary_table({1: ood, 2: ood})
    assert "turns away 100.0% of these images; it keeps none." in text and "accuracy on those it keeps —" in text
    assert not re.search(r"\bnan\b", text), text


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_evaluation_replaces_the_last_one_whole_and_a_stopped_one_changes_nothing(trained_all, tmp_path,
                                                                                        monkeypatch):
    """Written straight into --out, a file only the earlier evaluation wrote (the SVM's of an --svm one,
    the other folds of a 5-fold one) stayed beside the new outputs, and one stopped at fold 2 left a
    new fold beside old ones."""
    out = tmp_path / "eval"
    assert run_cli("testing.py", "--checkpoint", trained_all, "--fold", 1, "--svm", "--out", out).returncode == 0
    assert {"summary_svm.json", "fold1"} <= {p.name for p in out.iterdir()}
    assert {"heads.md", "svm"} <= {p.name for p in (out / "fold1").iterdir()}
    assert run_cli("testing.py", "--checkpoint", trained_all, "--fold", 2, "--out", out).returncode == 0
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"fold2"} and not (out / "summary_svm.json").exists()
    assert json.loads((out / "config.json").read_text())["out"] == str(out)
    before = _files(out)
    (tmp_path / ".eval.999999999-abcdefgh").mkdir()  # what one killed outright (kill -9) leaves: swept next time
    revive = killed_on_call(monkeypatch, testing, "evaluate_fold", 2)  # after fold 1's outputs are written
    assert run_cli("testing.py", "--checkpoint", trained_all, "--out", out).returncode == 130
    revive()
    assert _files(out) == before and [p.name for p in tmp_path.iterdir()] == ["eval"]  # nothing half-written
    (out / "my notes.txt").write_text("mine")  # a folder of the user's own files is refused, not emptied
    assert_one_line_error(run_cli("testing.py", "--checkpoint", trained_all, "--out", out),
                          f"--out {out}: holds my notes.txt, which this script does not write")
    assert (out / "my notes.txt").read_text() == "mine"
    (tmp_path / "here").mkdir()  # replaced, the current folder would leave a shell there in a deleted folder
    assert_one_line_error(run_cli("testing.py", "--checkpoint", trained_all, "--out", ".", cwd=tmp_path / "here"),
                          "the current folder")
    assert list((tmp_path / "here").iterdir()) == []
