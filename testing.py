"""Evaluate trained checkpoints on their fold's Test split: metrics, how far to trust them, plots.

    python testing.py --checkpoint runs/lenet-fold1/best.pt           # one fold
    python testing.py --checkpoint runs/lenet-all                     # every fold of a --fold all run
    python testing.py --checkpoint runs/r18-s0 runs/r18-s1 runs/r18-s2   # a seed ensemble (probabilities averaged)
    python testing.py --checkpoint runs/x/best.pt --tta --svm         # test-time views; SVM on the features
    python testing.py --checkpoint runs/x/best.pt --ood-dir my-photos # also score your own non-lesion photos

Probabilities are calibrated with the temperature fitted on Valid (stored in best.pt by train.py,
or fitted here when absent). Beside the scores: 95% bootstrap intervals over patients, expected
calibration error and a reliability diagram, risk against coverage as the confidence threshold
sweeps, and the Mpox threshold that reaches 95% sensitivity on Valid. Out of distribution: how well
each score (models/ood.py) tells the Test images from generated non-skin pictures, from synthetic
lesions (for a network trained on real photos), from --ood-dir photos and from the photos of the
class a `train.py --exclude-class` run never saw; and what the gate does to the Test images.
Writes metrics.json, predictions.csv, report.md, confusion.png, roc.png, reliability.png,
risk_coverage.png and ood.png to runs/NAME/test/ (or --out, never a training run's own folder); for a
5-fold run also summary.md (mean ± std and the interval of the mean over folds, and the scores over
the distinct Test images), pooled plots; and config.json, the command's resolved arguments.
"""
import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from getData import (FOLDS, POSITIVE_CLASS, SEED, SPLITS, SYNTHETIC_PATIENTS, DataError, MSLDDataset, Number, Parser,
                     atomic_path, atomic_write, check_images, decode_all, images_in, is_synthetic, list_classes,
                     not_skin_images, patient_id, prepare, run_main, synthetic_image, to_json, usable_folds_root)
from models import (MEMORY_FORMATS, PLAIN_VIEW, PRECISION_HELP, PRECISIONS, SCORES, TTA_VIEWS, ModelError, build_model,
                    derived_seed, detection_metrics, drawable, embed, find_checkpoints, fit_temperature, gate_by,
                    load_checkpoint, load_classifier, logits_and_features, mean_std, mean_std_table, ood_scores,
                    output_folder, photos_seen, predict_logits, probabilities, reference_for, resize_size, save_figure,
                    select_runtime)

DEFAULTS = dict(checkpoint=None, data_root=None, fold=None, split="Test", threshold=0.6, out=None, batch_size=64,
                device="auto", precision="auto", memory_format="auto", svm=False, tta=False, bootstrap=1000, seed=0,
                ood_dir=[], ood_score=None)
# SVM on deep features (Chaddad et al. 2025): C and kernel chosen on the Valid split.
SVM_GRID = [dict(kernel=k, C=c) for k in ("linear", "rbf") for c in (0.01, 0.1, 1.0, 10.0, 100.0)]
SUMMARY_KEYS = ["accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro",
                "roc_auc_macro", "mpox_sensitivity", "mpox_specificity", "ece"]
CI_KEYS = ["accuracy", "balanced_accuracy", "f1_macro", "mpox_sensitivity"]
ECE_BINS = 15  # equal-width bins on the top-class probability (Guo et al. 2017)
GATES = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the risk-coverage table's thresholds; 0.6 is Mpox-AISM's
MPOX_SENSITIVITY = 0.95
# what the script writes in --out; output_folder refuses a folder holding anything else
OUTPUTS = re.compile(r"config\.json|report\.md|metrics\.json|predictions\.csv|heads\.md|summary(_svm)?\.(md|json)"
                     r"|(confusion|roc|reliability|risk_coverage|ood)(_pooled)?(_svm)?\.png|svm|fold[1-5]")


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(np.asarray(y_true) * num_classes + np.asarray(y_pred),
                       minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _ratio(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    # 0 where undefined, like scikit-learn's zero_division=0
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def confusion_metrics(cm: np.ndarray, positive: int | None) -> dict:
    """The scores that follow from confusion matrices (..., C, C) (macro = unweighted over all classes;
    balanced accuracy over the classes present). Works on one matrix or a stack of them."""
    cm = np.asarray(cm, float)
    tp, support, predicted = np.diagonal(cm, axis1=-2, axis2=-1), cm.sum(-1), cm.sum(-2)
    total = support.sum(-1, keepdims=True)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = support > 0
    m = dict(accuracy=_ratio(tp.sum(-1), total[..., 0]),
             balanced_accuracy=_ratio((recall * present).sum(-1), present.sum(-1)),
             precision_macro=precision.mean(-1), recall_macro=recall.mean(-1), f1_macro=f1.mean(-1),
             precision_weighted=_ratio((precision * support).sum(-1), support.sum(-1)),
             recall_weighted=_ratio((recall * support).sum(-1), support.sum(-1)),
             f1_weighted=_ratio((f1 * support).sum(-1), support.sum(-1)),
             precision=precision, recall=recall, f1=f1, support=support,
             specificity=_ratio(total - support - predicted + tp, total - support))
    if positive is not None:  # Mpox vs the rest: the clinical question
        m["mpox_sensitivity"], m["mpox_specificity"] = m["recall"][..., positive], m["specificity"][..., positive]
    return m


def classification_metrics(y_true, probs, classes, positive: str = POSITIVE_CLASS) -> dict:
    """Every figure we report for one set of predictions, with per-class details."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    cm = confusion_matrix(y_true, probs.argmax(1), len(classes))
    c = confusion_metrics(cm, classes.index(positive) if positive in classes else None)
    auc = np.array([roc_auc_score(y_true == k, probs[:, k]) if 0 < c["support"][k] < len(y_true) else np.nan
                    for k in range(len(classes))])
    m = dict(n=int(cm.sum()), **{k: float(v) for k, v in c.items() if np.ndim(v) == 0},
             roc_auc_macro=float(np.nanmean(auc)) if not np.isnan(auc).all() else float("nan"))
    m["per_class"] = {name: dict(precision=float(c["precision"][i]), recall=float(c["recall"][i]), f1=float(c["f1"][i]),
                                 specificity=float(c["specificity"][i]), roc_auc=float(auc[i]),
                                 support=int(c["support"][i])) for i, name in enumerate(classes)}
    m["confusion"] = cm.tolist()
    return m


def gated_metrics(y_true, probs, classes, threshold: float) -> dict:
    """Confidence gating (Mpox-AISM): answer only when the top probability reaches `threshold`."""
    probs = np.asarray(probs)
    covered = probs.max(1) >= threshold
    out = dict(threshold=threshold, coverage=float(covered.mean()), n_covered=int(covered.sum()))
    if covered.any():
        covered_m = classification_metrics(np.asarray(y_true)[covered], probs[covered], classes)
        out.update({k: covered_m[k] for k in ("accuracy", "balanced_accuracy", "f1_macro")})
    return out


def calibration_bins(y_true, probs, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width bins (i-1)/M < confidence <= i/M of the top-class
    probability: sum over bins of |accuracy - confidence| weighted by the bin's share of images."""
    probs, y_true = np.asarray(probs), np.asarray(y_true)
    conf, correct = probs.max(1), (probs.argmax(1) == y_true).astype(float)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    acc, mean_conf = _ratio(np.bincount(idx, correct, bins), count), _ratio(np.bincount(idx, conf, bins), count)
    ece = float(np.sum(count / max(len(conf), 1) * np.abs(acc - mean_conf)))
    return ece, [dict(low=i / bins, high=(i + 1) / bins, n=int(count[i]), accuracy=float(acc[i]),
                      confidence=float(mean_conf[i])) for i in range(bins)]


def risk_coverage(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of the k most confident answers against coverage k/N, for k = 1..N."""
    order = np.argsort(-np.asarray(probs).max(1), kind="stable")
    correct = (np.asarray(probs).argmax(1) == np.asarray(y_true))[order]
    k = np.arange(1, len(order) + 1)
    return k / len(order), np.cumsum(correct) / k


def mpox_operating_point(valid_y, valid_probs, test_y, test_probs, positive: int,
                         target: float = MPOX_SENSITIVITY) -> dict:
    """The highest threshold on p(Mpox) whose Mpox sensitivity on Valid reaches `target`, and the
    sensitivity and specificity it gives on Test (calling Mpox when p(Mpox) >= threshold)."""
    p_valid = np.sort(np.asarray(valid_probs)[np.asarray(valid_y) == positive, positive])[::-1]
    if not len(p_valid):
        return {}
    t = float(p_valid[int(np.ceil(target * len(p_valid))) - 1])
    p, y = np.asarray(test_probs)[:, positive], np.asarray(test_y)
    return dict(target_sensitivity=target, threshold=t,
                valid_sensitivity=float(np.mean(p_valid >= t)),
                test_sensitivity=float(np.mean(p[y == positive] >= t)) if (y == positive).any() else float("nan"),
                test_specificity=float(np.mean(p[y != positive] < t)) if (y != positive).any() else float("nan"))


def bootstrap(y_true, probs, groups, num_classes: int, positive: int | None, resamples: int, seed: int) -> np.ndarray:
    """CI_KEYS of `resamples` bootstrap replicates (resamples x len(CI_KEYS)): whole patients drawn
    with replacement (images of one patient are not independent), each replicate's images weighted by
    how often their patient was drawn."""
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    counts = np.random.default_rng(seed).multinomial(len(names), np.full(len(names), 1 / len(names)), size=resamples)
    cell = np.asarray(y_true) * num_classes + np.asarray(probs).argmax(1)
    cms = (counts[:, inverse] @ np.eye(num_classes ** 2)[cell]).reshape(resamples, num_classes, num_classes)
    m = confusion_metrics(cms, positive)
    return np.stack([m[k] if k in m else np.full(resamples, np.nan) for k in CI_KEYS], 1)


def interval(samples: np.ndarray) -> dict:
    """Percentile 95% intervals of bootstrap samples (resamples x len(CI_KEYS)); none for a score that
    no resample defines (Mpox sensitivity for a network trained without Mpox)."""
    defined = ~np.isnan(samples).all(0)
    low, high = np.nanpercentile(samples[:, defined], [2.5, 97.5], axis=0)
    return {k: [float(a), float(b)] for k, a, b in zip(np.array(CI_KEYS)[defined], low, high)}


# ----------------------------------------------------------------------------- SVM head
def fit_svm(train_x, train_y, valid_x, valid_y):
    """Standardised features -> SVC; the (kernel, C) with the best Valid balanced accuracy wins.
    Returns (fitted pipeline with predict_proba, the chosen parameters and their Valid score)."""
    best = None
    for params in SVM_GRID:
        # Platt-style probabilities from held-out folds (what SVC(probability=True) did, now deprecated)
        clf = make_pipeline(StandardScaler(), CalibratedClassifierCV(SVC(**params), ensemble=False, cv=3))
        clf.fit(train_x, train_y)
        cm = confusion_matrix(valid_y, clf.predict(valid_x), int(max(train_y.max(), valid_y.max())) + 1)
        score = float(confusion_metrics(cm, None)["balanced_accuracy"])
        if best is None or score > best[2]:
            best = (clf, params, score)
    return best[0], dict(best[1], valid_balanced_accuracy=best[2])


def svm_probabilities(classes: list, clf, x) -> np.ndarray:
    """predict_proba with a column for every class, also ones absent from the SVM's training set."""
    probs = np.zeros((len(x), len(classes)))
    probs[:, clf.classes_] = clf.predict_proba(x)
    return probs


# ----------------------------------------------------------------------------- plots
def plot_confusion(cm, classes, path, title="") -> None:
    cm = np.asarray(cm)
    norm, labels = _ratio(cm, cm.sum(1, keepdims=True)), [drawable(c) for c in classes]
    fig = Figure(figsize=(13, 5.5))
    for ax, data, fmt, name in zip(fig.subplots(1, 2), (cm, norm), ("d", ".2f"), ("counts", "row-normalised (recall)")):
        ax.imshow(data, cmap="Blues", vmin=0)
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
               title=f"{title} {name}".strip())
        ax.set_xticklabels(labels, rotation=45, ha="right")
        ax.set_yticklabels(labels)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, format(data[i, j], fmt), ha="center", va="center",
                        color="white" if data[i, j] > data.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_roc(y_true, probs, classes, path) -> None:
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    for c, name in enumerate(classes):
        if 0 < (y_true == c).sum() < len(y_true):
            fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
            ax.plot(fpr, tpr, label=f"{drawable(name)} (AUC {roc_auc_score(y_true == c, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="one-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path, dpi=110)


def plot_reliability(y_true, probs, path, title="") -> None:
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    ece, bins = calibration_bins(y_true, probs)
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    used = [b for b in bins if b["n"]]
    width = 1 / ECE_BINS
    ax.bar([b["low"] for b in used], [b["accuracy"] for b in used], width, align="edge", edgecolor="k",
           label="accuracy in bin")
    ax.bar([b["low"] for b in used], [abs(b["confidence"] - b["accuracy"]) for b in used], width,
           bottom=[min(b["accuracy"], b["confidence"]) for b in used], align="edge", fill=False, hatch="//",
           edgecolor="tab:red", label="gap to the bin's mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-class probability)", ylabel="accuracy",
           title=f"{title} ECE {ece:.3f} (n={len(np.asarray(y_true))})".strip())
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path, dpi=110)


def plot_risk_coverage(y_true, probs, path, gate: float) -> None:
    coverage, accuracy = risk_coverage(y_true, probs)
    g = gated_metrics(y_true, probs, list(range(np.asarray(probs).shape[1])), gate)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    ax.plot(coverage, accuracy)
    if g["n_covered"]:
        ax.plot([g["coverage"]], [g["accuracy"]], "o", color="tab:red", label=f"gate {gate} (Mpox-AISM)")
        ax.legend(loc="lower left")
    ax.set(xlabel="coverage (share of images answered)", ylabel="accuracy on the answered images", ylim=(0, 1.02),
           title="answering only the most confident images")
    save_figure(fig, path, dpi=110)


def plot_ood(scores: dict[str, np.ndarray], threshold: float, score: str, path) -> None:
    """Histograms of the gate's score for the Test photos and each out-of-distribution set, with the
    threshold that keeps 95% of Valid: what lies right of the line gets no diagnosis."""
    finite = np.concatenate([v[np.isfinite(v)] for v in scores.values()])
    low, high = (finite.min(), finite.max()) if finite.size else (0, 0)
    log = low > 0 and high > 100 * low  # distances spanning decades (noise can lie 100x beyond the gate)
    bins = np.geomspace(low, high, 50) if log else np.linspace(low, high, 50) if high > low else 10
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, v in scores.items():
        v = v[np.isfinite(v)]
        ax.hist(v, bins, weights=np.full(len(v), 1 / len(v)), histtype="step", lw=1.5, label=f"{name} ({len(v)})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label="gate (keeps 95% of Valid)")
    ax.set(xscale="log" if log else "linear", xlabel=f"{score} score (higher: less like the Train photos)",
           ylabel="share of the set's images", title="out of distribution: the gate's score")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Head:
    """One head's predictions on one fold: calibrated and raw Test probabilities, Valid probabilities."""
    probs: np.ndarray
    raw: np.ndarray
    valid: np.ndarray
    extra: dict


class FoldImages:
    """A fold's splits, each decoded once per image size, with the checkpoint's classes (and the class
    its run left out, if any)."""

    def __init__(self, folds_root, fold: int, classes: list[str], exclude: str | None = None):
        self.folds_root, self.fold, self.classes, self.exclude, self._cache = folds_root, fold, classes, exclude, {}

    def __call__(self, split: str, size: int, classes: list[str] | None = None) -> MSLDDataset:
        classes = classes or self.classes
        if (split, size, *classes) not in self._cache:
            self._cache[split, size, *classes] = MSLDDataset(self.folds_root, self.fold, split, cache_size=size,
                                                             classes=classes)
        return self._cache[split, size, *classes]


def load_for_eval(checkpoint, svm: bool, rt):
    """(model in eval mode, placed by the runtime `rt`; checkpoint; has_head): a classifier, or (for
    --svm only) a SimCLR encoder."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("kind") != "encoder":
        return *load_classifier(checkpoint, rt), True
    if not svm:
        raise ModelError(f"{checkpoint}: a SimCLR encoder has no classifier head; evaluate it with --svm "
                         "or fine-tune it with `train.py --init` first")
    model = build_model(ckpt["model"], len(ckpt["classes"]), init=str(checkpoint), input_size=ckpt["input_size"])
    return rt.module(model.eval()), ckpt, False


def softmax_head(members, images: FoldImages, split: str, rt, batch_size: int, tta: bool) -> Head:
    """Every member's temperature-scaled probabilities, averaged (one member: no ensemble). Each
    member's temperature is the one in its best.pt, fitted on Valid for its plain view; with --tta it
    is fitted again here on Valid for the test-time views."""
    views = TTA_VIEWS if tta else PLAIN_VIEW
    probs, raw, valid, temps = [], [], [], []
    for model, ckpt, _ in members:
        size = resize_size(model.input_size)
        valid_set = images("Valid", size)
        logits_valid = predict_logits(model, valid_set.images, rt, batch_size, views)
        logits = predict_logits(model, images(split, size).images, rt, batch_size, views)
        t = ckpt.get("temperature") if not tta and ckpt.get("temperature") else fit_temperature(logits_valid,
                                                                                                 valid_set.targets)
        probs.append(probabilities(logits, t))
        raw.append(probabilities(logits))
        valid.append(probabilities(logits_valid, t))
        temps.append(t)
    mean = lambda ps: torch.stack(ps).mean(0).numpy()  # noqa: E731
    return Head(mean(probs), mean(raw), mean(valid), dict(temperature=temps[0] if len(temps) == 1 else temps,
                                                         members=len(members), tta=tta))


def svm_head(model, classes, images: FoldImages, split: str, rt, batch_size: int) -> Head:
    size = resize_size(model.input_size)
    train, valid, test = (images(s, size) for s in ("Train", "Valid", split))
    feats = [embed(model, d.images, rt, batch_size).numpy() for d in (train, valid, test)]
    clf, choice = fit_svm(feats[0], train.targets.numpy(), feats[1], valid.targets.numpy())
    probs = svm_probabilities(classes, clf, feats[2])
    return Head(probs, probs, svm_probabilities(classes, clf, feats[1]), dict(svm=choice, temperature=1.0))


def head_metrics(head: Head, ds: MSLDDataset, valid_y, threshold: float, resamples: int, seed: int) -> dict:
    classes, y = ds.classes, ds.targets.numpy()
    positive = classes.index(POSITIVE_CLASS) if POSITIVE_CLASS in classes else None
    m = classification_metrics(y, head.probs, classes)
    m["ece"], m["calibration_bins"] = calibration_bins(y, head.probs)
    m["ece_raw"] = calibration_bins(y, head.raw)[0]
    m.update(head.extra, gated=gated_metrics(y, head.probs, classes, threshold),
             risk_coverage=[gated_metrics(y, head.probs, classes, g) for g in GATES])
    if positive is not None:
        m["mpox_operating_point"] = mpox_operating_point(valid_y, head.valid, y, head.probs, positive)
    groups = [patient_id(p) or str(p) for p in ds.paths]
    m["ci95"] = interval(bootstrap(y, head.probs, groups, len(classes), positive, resamples, seed))
    m["bootstrap"] = dict(resamples=resamples, seed=seed, unit="patient", patients=len(set(groups)))
    return m


def predictions_csv(paths, y_true, probs, classes, gate_columns: dict | None = None) -> str:
    """One row per image: its class, the prediction, the probabilities; with an OOD reference also the
    gate's score and whether the gate keeps the image."""
    buf = io.StringIO()
    w = csv.writer(buf)
    extra = list(gate_columns or {})
    w.writerow(["file", "true", "predicted", *[f"p_{c}" for c in classes], *extra])
    for i, (p, y, pr) in enumerate(zip(paths, y_true, probs)):
        w.writerow([p, classes[y], classes[int(np.argmax(pr))], *[f"{v:.6f}" for v in pr],
                    *[f"{gate_columns[k][i]:.6f}" if k == "ood_score" else bool(gate_columns[k][i]) for k in extra]])
    return buf.getvalue()


def write_outputs(out: Path, m: dict, ds: MSLDDataset, probs, gate_columns: dict | None = None) -> None:
    y = ds.targets.numpy()
    atomic_write(out / "metrics.json", to_json(m, indent=2))
    atomic_write(out / "predictions.csv", predictions_csv(ds.paths, y, probs, ds.classes, gate_columns))
    atomic_write(out / "report.md", report_markdown(m))
    title = f"fold {m['fold']} {m['split']} {m['head']}"
    plot_confusion(m["confusion"], ds.classes, out / "confusion.png", title=title)
    plot_roc(y, probs, ds.classes, out / "roc.png")
    plot_reliability(y, probs, out / "reliability.png", title=title)
    plot_risk_coverage(y, probs, out / "risk_coverage.png", m["gated"]["threshold"])


@dataclass
class FoldResult:
    metrics: dict
    paths: list
    y: np.ndarray
    probs: np.ndarray


def fold_images(checkpoints: list, ckpts: list[dict], data_root, fold) -> FoldImages:
    """The images of the members' fold, once the members agree with each other (fold, classes) and
    with the data root (its classes, less the one the run excluded)."""
    ckpt = ckpts[0]
    data_root = data_root or ckpt["config"].get("data_root")
    fold = fold or ckpt.get("fold") or ckpt["config"].get("fold")
    if data_root is None or fold is None:
        raise DataError(f"{checkpoints[0]}: records no dataset or fold; pass --data-root and --fold")
    for c, other in zip(checkpoints[1:], ckpts[1:]):
        if other["classes"] != ckpt["classes"] or (other.get("fold") or fold) != fold:
            raise ModelError(f"{c}: an ensemble's checkpoints must share the fold and the classes of {checkpoints[0]}")
    root, exclude = usable_folds_root(data_root), ckpt["config"].get("exclude_class")
    expected = [c for c in list_classes(root) if c != exclude]
    if expected != ckpt["classes"]:
        trained_on = ckpt["config"].get("data_root")
        raise DataError(f"{data_root}: classes {expected} differ from the checkpoint's {ckpt['classes']}; evaluate it "
                        + (f"on the data it trained on (--data-root {trained_on})" if trained_on and
                           Path(trained_on).resolve() != Path(data_root).resolve() else "on data with its classes"))
    return FoldImages(root, int(fold), ckpt["classes"], exclude)


def fold_ood(model, reference: dict, images: FoldImages, ds, probs, rt, batch_size: int, ood_files, seed: int,
             out) -> tuple[dict, dict]:
    """ood_evaluation of the split's images `ds` against the built-in sets, the user's --ood-dir photos
    and (near-OOD) every photo of the class the run excluded, in all three splits; ood.png."""
    size = resize_size(model.input_size)
    near = torch.cat([images(s, size, [images.exclude]).images for s in SPLITS]) if images.exclude else None
    sets = ood_sets(ds.images, size, not is_synthetic(images.folds_root), near, ood_files, seed)
    ood, gate_columns, by_set = ood_evaluation(model, reference, ds, probs, rt, batch_size, sets)
    plot_ood(by_set, ood["threshold"], ood["score"], Path(out) / "ood.png")
    return ood, gate_columns


def evaluate_fold(checkpoints: list, out, *, rt=None, data_root=None, fold=None, split="Test", threshold=0.6,
                  batch_size=64, svm=False, tta=False, resamples=1000, seed=0, ood_files=(),
                  ood_score=None) -> dict[str, FoldResult]:
    """Evaluate one fold's checkpoint (several: an ensemble) on its `split`, per head asked for:
    "softmax" (calibrated, averaged over members; with the out-of-distribution scores of the first
    member) and "svm". Outputs go to `out` and `out/svm`."""
    rt = rt or select_runtime()
    members = [load_for_eval(c, svm, rt) for c in checkpoints]
    model, ckpt = members[0][:2]
    images = fold_images(checkpoints, [m[1] for m in members], data_root, fold)
    fold, size = images.fold, resize_size(model.input_size)
    ds = images(split, size)
    if seen := photos_seen(ckpt, images.folds_root, images.classes, ds.paths):  # fold 2's Test holds fold 1's Train
        print(f"note: {seen} of the {len(ds)} photos of fold {fold}'s {split} split are photos {checkpoints[0]} "
              f"learned from (fold {ckpt['fold']}): its scores here are optimistic")
    heads = {}
    if all(has_head for *_, has_head in members):
        heads["softmax"] = softmax_head(members, images, split, rt, batch_size, tta)
    if svm:
        heads["svm"] = svm_head(model, ds.classes, images, split, rt, batch_size)
    valid_y = images("Valid", size).targets.numpy()
    ood, gate_columns = {}, None
    reference = reference_for(ckpt, model, rt, checkpoints[0], images.folds_root, fold) if "softmax" in heads else None
    reference = gate_by(reference, ood_score)
    if reference is not None:
        ood, gate_columns = fold_ood(model, reference, images, ds, heads["softmax"].probs, rt, batch_size,
                                     ood_files, seed, out)
    results = {}
    for name, head in heads.items():
        m = head_metrics(head, ds, valid_y, threshold, resamples, derived_seed(seed, fold))
        m.update(fold=fold, split=split, checkpoint=[str(c) for c in checkpoints] if len(checkpoints) > 1
                 else str(checkpoints[0]), checkpoint_id=file_id(checkpoints[0]), model=ckpt["model"], head=name,
                 seen_in_training=seen,
                 **({"ood": ood} if name == "softmax" and ood else {}))
        write_outputs(Path(out) / ("svm" if name == "svm" else ""), m, ds, head.probs,
                      gate_columns if name == "softmax" else None)
        results[name] = FoldResult(m, [str(p) for p in ds.paths], ds.targets.numpy(), head.probs)
    if len(results) > 1:
        atomic_write(Path(out) / "heads.md", heads_table({h: r.metrics for h, r in results.items()}))
    return results


def file_id(path) -> str:
    """The first 12 hex digits of a file's SHA-1: serve.py shows Test scores only for that very file."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]


def heads_table(by_head: dict[str, dict]) -> str:
    """The softmax head and the SVM side by side, one row per metric."""
    lines = ["| metric | " + " | ".join(by_head) + " |", "|---" * (len(by_head) + 1) + "|"]
    for k in SUMMARY_KEYS:
        if all(k in m for m in by_head.values()):
            lines.append(f"| {k} | " + " | ".join(f"{m[k]:.4f}" for m in by_head.values()) + " |")
    return "\n".join(lines) + "\n"


def _ci_line(ci: dict) -> str:
    return "95% CI (bootstrap over patients): " + ", ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in ci.items())


def report_markdown(m: dict) -> str:
    g = m["gated"]
    gate = (f"Confidence gate {g['threshold']}: coverage {g['coverage']:.3f} ({g['n_covered']} of {m['n']})"
            + (f", accuracy on covered {g['accuracy']:.4f}, balanced accuracy {g['balanced_accuracy']:.4f}"
               if g["n_covered"] else ""))
    head = " | ".join(f"{k} {m[k]:.4f}" for k in SUMMARY_KEYS if k in m)
    rc = ["| threshold | coverage | accuracy on covered |", "|---|---|---|"] + [
        f"| {r['threshold']} | {r['coverage']:.3f} | {r['accuracy']:.3f} |" if "accuracy" in r  # none covered: —
        else f"| {r['threshold']} | {r['coverage']:.3f} | — |"
        for r in m["risk_coverage"]]
    op = m.get("mpox_operating_point") or {}
    mpox = (f"Mpox threshold for {op['target_sensitivity']:.0%} sensitivity on Valid: "
            f"p(Mpox) >= {op['threshold']:.3f}; on {m['split']}: sensitivity {op['test_sensitivity']:.3f}, "
            f"specificity {op['test_specificity']:.3f}\n"
            if op else "")
    temperature = ", ".join(f"{t:.4f}" for t in np.atleast_1d(m["temperature"]))  # an ensemble's: one per member
    return (f"# {m['model']} fold {m['fold']} {m['split']}, {m['head']} head (n={m['n']})\n\n{head}\n\n"
            f"{_ci_line(m['ci95'])}\n\nCalibration: ECE {m['ece']:.4f} (before temperature scaling "
            f"{m['ece_raw']:.4f}; temperature {temperature})\n\n{per_class_table(m)}\n{gate}\n\n"
            + "\n".join(rc) + "\n\n" + mpox + ("\n" + ood_markdown(m["ood"]) if m.get("ood") else ""))


def per_class_table(m: dict) -> str:
    lines = ["| class | precision | recall | F1 | specificity | ROC-AUC | support |", "|---" * 7 + "|"]
    for c, v in m["per_class"].items():
        lines.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['specificity']:.3f} "
                     f"| {v['roc_auc']:.3f} | {v['support']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- out of distribution
def ood_sets(test_images: torch.Tensor, size: int, real_data: bool, exclude_images, ood_files, seed: int):
    """The images the gate should refuse, as uint8 caches (N, 3, S, S), by set and (not_skin) kind:
    generated non-skin pictures and the Test photos with their colour channels scrambled; for a
    network trained on real photos the synthetic lesions; the user's --ood-dir photos; and the
    photos of the class the network was trained without (near-OOD; from all three splits, since it
    saw none of them: a fold's Test split alone holds 5 to 20 photos of a small class)."""
    kinds = {}
    for kind, im in not_skin_images(seed):
        kinds.setdefault(kind, []).append(prepare(im, size))
    kinds = {k: torch.stack(v) for k, v in kinds.items()}
    kinds["scrambled_channels"] = test_images[:, [2, 0, 1]]  # skin photos in colours skin never has
    sets = {"not_skin": kinds}
    if real_data:
        rng = np.random.default_rng(seed)
        sets["synthetic_lesions"] = {"all": torch.stack([prepare(synthetic_image(c, rng), size)
                                                         for c in SYNTHETIC_PATIENTS for _ in range(8)])}
    if ood_files:
        sets["ood_dir"] = {"all": decode_all(ood_files, size, desc="--ood-dir", shrink=True)}
    if exclude_images is not None:
        sets["near"] = {"all": exclude_images}
    return sets


def ood_evaluation(model, reference: dict, test, probs, rt, batch_size: int, sets: dict) -> tuple[dict, dict, dict]:
    """Every OOD score's AUROC and FPR at 95% TPR for each set against the Test images (and, for the
    gate's score, for each kind of non-skin picture); what the gate does to the Test images: the
    share it turns away and the accuracy on those it keeps. Returns (metrics, per-image gate columns,
    the gate's score of the Test images and of each set's)."""
    def scores(images):
        logits, features = logits_and_features(model, images, rt, batch_size)
        return ood_scores(reference, features, logits[0])
    inside = scores(test.images)
    out = dict(score=reference["score"], threshold=reference["thresholds"][reference["score"]], sets={}, kinds={})
    by_set = {"Test": inside[out["score"]].numpy()}
    for name, kinds in sets.items():
        per_kind = {kind: scores(images) for kind, images in kinds.items()}
        pooled = {s: torch.cat([v[s] for v in per_kind.values()]) for s in SCORES}
        out["sets"][name] = {s: detection_metrics(inside[s], pooled[s]) for s in SCORES}
        by_set[name] = pooled[out["score"]].numpy()
        if name == "not_skin":
            out["kinds"] = {kind: {s: detection_metrics(inside[s], v[s]) for s in SCORES}
                            for kind, v in per_kind.items()}
    kept = (inside[out["score"]] <= out["threshold"]).numpy()
    out["gate"] = dict(rejected_share=float(1 - kept.mean()), n_kept=int(kept.sum()), n=len(kept))
    if kept.any():
        m = classification_metrics(test.targets.numpy()[kept], np.asarray(probs)[kept], test.classes)
        out["gate"].update(accuracy_kept=m["accuracy"], balanced_accuracy_kept=m["balanced_accuracy"])
    return out, dict(ood_score=by_set["Test"], in_distribution=kept), by_set


def ood_markdown(ood: dict) -> str:
    g = ood["gate"]
    lines = [f"Out of distribution: the gate ({ood['score']} <= {ood['threshold']:.4f}, keeping 95% of Valid) turns "
             f"away {g['rejected_share']:.1%} of these images" + (f"; accuracy on the {g['n_kept']} it keeps "
             f"{g['accuracy_kept']:.4f}." if g["n_kept"] else "; it keeps none."), "",
             "| set | images | " + " | ".join(f"{s} AUROC | {s} FPR95" for s in SCORES) + " |",
             "|---" * (2 + 2 * len(SCORES)) + "|"]
    for name, by_score in ood["sets"].items():
        lines.append(f"| {name} | {by_score[SCORES[0]]['n_out']} | "
                     + " | ".join(f"{by_score[s]['auroc']:.3f} | {by_score[s]['fpr95']:.3f}" for s in SCORES) + " |")
    kinds = ", ".join(f"{k} {v[ood['score']]['auroc']:.3f}" for k, v in ood["kinds"].items())
    return "\n".join(lines) + f"\n\n{ood['score']} AUROC by kind of non-skin picture: {kinds}\n"


def ood_summary_table(folds: dict[int, dict]) -> str:
    """Mean ± std over folds of each score's AUROC and FPR95 per set; the gate's share turned away; the
    mean AUROC of each score by kind of non-skin picture."""
    lines = ["| set | score | AUROC | FPR95 |", "|---|---|---|---|"]
    first = next(iter(folds.values()))
    for name in first["sets"]:
        for s in SCORES:
            a = [f["sets"][name][s]["auroc"] for f in folds.values() if name in f["sets"]]
            r = [f["sets"][name][s]["fpr95"] for f in folds.values() if name in f["sets"]]
            lines.append(f"| {name} | {s} | {mean_std(a, 3)} | {mean_std(r, 3)} |")
    gates = [f["gate"] for f in folds.values()]
    rejected = [g["rejected_share"] for g in gates]
    kept = [g["accuracy_kept"] for g in gates if "accuracy_kept" in g]  # a fold whose gate keeps none has none
    kinds = list(first["kinds"])
    over = f"; the accuracy over the {len(kept)} that keep any" if 0 < len(kept) < len(folds) else ""
    lines += ["", f"The gate ({first['score']}) turns away {mean_std(rejected, 3)} of the Test images; accuracy on "
              f"those it keeps {mean_std(kept, 3) if kept else '—'} ({len(folds)} fold{'s' * (len(folds) > 1)}, "
              f"mean ± std{over}).", "",
              "AUROC by kind of non-skin picture (mean over folds):", "",
              "| score | " + " | ".join(kinds) + " |", "|---" * (1 + len(kinds)) + "|"]
    lines += [f"| {s} | " + " | ".join(f"{np.mean([f['kinds'][k][s]['auroc'] for f in folds.values()]):.2f}"
                                       for k in kinds) + " |" for s in SCORES]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- 5 folds
def distinct_images(folds: dict[int, FoldResult], classes: list) -> tuple[list, np.ndarray, np.ndarray]:
    """The Test images of all folds counted once (MSLD v2.0's Test sets overlap): each image keeps the
    prediction of the first fold (1..5) whose Test split holds it."""
    seen, paths, ys, probs = set(), [], [], []
    for k in sorted(folds):
        r = folds[k]
        for p, y, pr in zip(r.paths, r.y, r.probs):
            name = f"{classes[y]}/{Path(p).name}"
            if name not in seen:
                seen.add(name)
                paths.append(p)
                ys.append(y)
                probs.append(pr)
    return paths, np.array(ys), np.array(probs)


def distinct_metrics(folds: dict[int, FoldResult], classes: list[str], positive, resamples: int, seed: int) -> dict:
    """The metrics, ECE and patient-bootstrap interval over the distinct Test images of the folds (each
    scored once, by the first fold whose Test split holds it); n, their number."""
    paths, y, probs = distinct_images(folds, classes)
    distinct = classification_metrics(y, probs, classes)
    distinct["ece"] = calibration_bins(y, probs)[0]
    distinct["ci95"] = interval(bootstrap(y, probs, [patient_id(p) or p for p in paths], len(classes), positive,
                                          resamples, derived_seed(seed, 0)))
    return dict(distinct, n=len(y))


def pooled_plots(folds: dict[int, FoldResult], classes: list[str], head: str, path: str) -> dict:
    """The confusion matrix and reliability diagram pooled over the folds (`path` with {} for the kind
    of plot); their numbers for summary.json."""
    y, probs = (np.concatenate([getattr(r, a) for r in folds.values()]) for a in ("y", "probs"))
    confusion = np.sum([r.metrics["confusion"] for r in folds.values()], axis=0)
    plot_confusion(confusion, classes, path.format("confusion"), title=f"{head}, pooled over folds")
    plot_reliability(y, probs, path.format("reliability"), title=f"{head}, pooled")
    return dict(pooled_confusion=confusion.tolist(), pooled_ece=calibration_bins(y, probs)[0])


def fold_summary(name: str, head: str, folds: dict[int, FoldResult], out: Path, threshold: float, resamples: int,
                 seed: int) -> tuple[list[str], dict]:
    """summary.md's section for one head: per-fold table with mean ± std and the interval of the mean,
    the confidence gate, the distinct Test images; pooled plots; summary.json's numbers."""
    metrics = {k: r.metrics for k, r in folds.items()}
    classes = list(next(iter(metrics.values()))["per_class"])
    positive = classes.index(POSITIVE_CLASS) if POSITIVE_CLASS in classes else None
    rows = [dict(fold=k, **{key: m[key] for key in SUMMARY_KEYS if key in m}) for k, m in metrics.items()]
    samples = [bootstrap(r.y, r.probs, [patient_id(p) or p for p in r.paths], len(classes), positive, resamples,
                         derived_seed(seed, k)) for k, r in folds.items()]  # the same replicates as per fold
    ci_mean = interval(np.mean(samples, 0))
    gated = [dict(fold=k, coverage=m["gated"]["coverage"], **{f"covered_{key}": m["gated"][key]
                                                              for key in ("accuracy", "balanced_accuracy")
                                                              if key in m["gated"]}) for k, m in metrics.items()]
    gate_keys = ["coverage", "covered_accuracy", "covered_balanced_accuracy"]  # none where a fold's gate keeps none
    distinct = distinct_metrics(folds, classes, positive, resamples, seed)
    entries = sum(len(r.y) for r in folds.values())
    mpox = distinct.get("mpox_sensitivity", np.nan)  # none for a network trained without Mpox
    suffix = "" if head == "softmax" else f"_{head}"
    lines = [f"## {head} head\n", mean_std_table(rows, SUMMARY_KEYS),
             f"\n95% CI of the {len(folds)}-fold mean (bootstrap over patients within each fold, {resamples} "
             "resamples): " + ", ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in ci_mean.items()) + "\n",
             f"\nDistinct Test images: the {len(folds)} Test splits hold {entries} entries but only {distinct['n']} "
             f"distinct images; each is scored once, with the prediction of the first fold whose Test split holds it: "
             f"accuracy {distinct['accuracy']:.4f}, balanced accuracy {distinct['balanced_accuracy']:.4f}, "
             f"macro F1 {distinct['f1_macro']:.4f}, " + (f"Mpox sensitivity {mpox:.4f}, " if np.isfinite(mpox) else "")
             + f"ECE {distinct['ece']:.4f}. "
             f"{_ci_line(distinct['ci95'])}.\n",
             f"\nConfidence gate {threshold}:\n", mean_std_table(gated, gate_keys)]
    oods = {k: m["ood"] for k, m in metrics.items() if m.get("ood")}
    if oods:
        lines += ["\nOut of distribution (AUROC and FPR at 95% TPR against each fold's Test images):\n",
                  ood_summary_table(oods)]
    numbers = dict(folds=rows, ci95_of_mean=ci_mean, gated=gated, distinct=dict(
        n=distinct["n"], entries=entries, **{k: distinct[k] for k in SUMMARY_KEYS + ["ci95"] if k in distinct}),
        **pooled_plots(folds, classes, head, str(out / f"{{}}_pooled{suffix}.png")), ood=oods)
    atomic_write(out / f"summary{suffix}.json", to_json(numbers, indent=2))
    return lines, {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "fold"}


def common_folds(checkpoints: list, found: list[dict], only: int | None = None) -> list[int]:
    """The folds every --fold all run has a best.pt for (fold `only` alone, when asked); a note names
    those left out (a run that stopped, or is still training), so a mean over fewer than five folds
    is never taken for all five."""
    folds = sorted(set.intersection(*(set(f) for f in found)))
    if only is not None:
        if only not in folds:
            raise ModelError(f"--fold {only}: no best.pt for it in {' '.join(map(str, checkpoints))}; choose "
                             f"{', '.join(map(str, folds)) or 'a fold that finished'}")
        return [only]
    if not folds:
        raise ModelError(f"--checkpoint {' '.join(map(str, checkpoints))}: no fold has a best.pt in every run; "
                         "an ensemble needs the same folds trained")
    for path, f in zip(checkpoints, found):
        if missing := [k for k in FOLDS if k not in f]:
            print(f"note: {path} has no best.pt for {', '.join(f'fold{k}' for k in missing)} (stopped or still "
                  f"training); the summary is over {', '.join(f'fold{k}' for k in folds)}")
    return folds


def evaluate(checkpoints, out=None, config: dict | None = None, **kw) -> dict:
    """One checkpoint or several (an ensemble), each a best.pt, a run directory holding one, or a
    --fold all directory of foldK/ runs. Returns {head: FoldResult} or {fold: {head: FoldResult}}.
    `config` (the command's resolved arguments) is saved beside the outputs as config.json."""
    checkpoints = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    found = [find_checkpoints(c) for c in checkpoints]
    # the photos of --ood-dir folders, listed and read once (one line now, not after the evaluation, if there are
    # none or one is not a whole image)
    kw["ood_files"] = images_in(kw.pop("ood_dirs", None) or (), "--ood-dir")
    check_images(kw["ood_files"], desc="--ood-dir")
    tag, single = "test" if len(found) == 1 else f"test-ensemble{len(found)}", all(None in f for f in found)
    if not single and any(None in f for f in found):
        raise ModelError("--checkpoint: give checkpoints of single folds, or --fold all run directories, not both")
    refuse_repeated_members(checkpoints, found)
    out = output_folder(out or (found[0][None].parent if single else Path(checkpoints[0])) / tag, tag, OUTPUTS)
    with atomic_path(out, folder=True) as folder:  # out's earlier outputs go whole, once these are all written
        if single:
            result = evaluate_fold([f[None] for f in found], folder, **kw)
        else:
            result = evaluate_folds(checkpoints, found, folder, **kw)
        if config is not None:
            atomic_write(folder / "config.json", to_json(dict(config, out=str(out)), indent=2, default=str))
    if single:  # a --fold all run printed its summary over the folds
        print("\n".join(report_markdown(r.metrics) for r in result.values()))
        if len(result) > 1:
            print(heads_table({h: r.metrics for h, r in result.items()}))
    what = "report.md, metrics.json, predictions.csv and the" if single else \
        "summary.md and each fold's report, metrics, predictions and"
    print(f"wrote {what} figures to {out}/")
    return result


def refuse_repeated_members(checkpoints: list, found: list[dict]) -> None:
    """An ensemble that names one network twice (`runs/a` and `runs/a/best.pt`) would count it twice."""
    first = {}
    for i, files in enumerate(found):
        for path in files.values():
            if (earlier := first.setdefault(Path(path).resolve(), i)) != i:
                raise ModelError(f"--checkpoint {checkpoints[i]}: names {path} again (as --checkpoint "
                                 f"{checkpoints[earlier]}); give each network of an ensemble once")


def evaluate_folds(checkpoints: list, found: list[dict], out: Path, **kw) -> dict:
    """Every fold of --fold all runs (several: an ensemble per fold), and their summary over folds."""
    if kw.get("svm") and len(found) > 1:
        raise ModelError("--svm fits one network's features: give one checkpoint or run directory")
    folds = common_folds(checkpoints, found, kw.pop("fold", None))  # each fold's checkpoints know their fold
    per_fold = {k: evaluate_fold([f[k] for f in found], out / f"fold{k}", fold=k, **kw) for k in folds}
    what = Path(checkpoints[0]).name + (f" + {len(found) - 1} more (ensemble)" if len(found) > 1 else "")
    which = f"{len(folds)} folds" if len(folds) == len(FOLDS) else \
        f"{len(folds)} fold{'s' * (len(folds) > 1)} ({', '.join(f'fold{k}' for k in folds)} only)"
    summary, means = [f"# {what}: {which}, {kw.get('split', 'Test')} split\n"], {}
    for head in next(iter(per_fold.values())):
        lines, means[head] = fold_summary(what, head, {k: r[head] for k, r in per_fold.items()}, out,
                                          kw.get("threshold", 0.6), kw.get("resamples", 1000), kw.get("seed", 0))
        summary += lines
    if len(means) > 1:
        summary += ["## heads side by side (mean over folds)\n", heads_table(means)]
    atomic_write(out / "summary.md", "\n".join(summary))
    print("\n".join(summary))
    return per_fold


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    d = DEFAULTS
    p = Parser(__doc__, __file__)
    p.add_argument("--checkpoint", nargs="+", action="extend", required=True,
                   help="best.pt or a run directory (--fold all runs too); several: an ensemble")
    p.add_argument("--data-root", default=d["data_root"], help="default: the one the run trained on")
    p.add_argument("--fold", type=int, default=d["fold"], choices=FOLDS,
                   help="the fold whose --split to use (default: the checkpoint's); for a --fold all run, that "
                   "fold alone (default: every fold)")
    p.add_argument("--split", default=d["split"], choices=["Train", "Valid", "Test"])
    p.add_argument("--threshold", type=Number(float, 0, 1), default=d["threshold"], help="confidence gate")
    p.add_argument("--tta", action="store_true",
                   help=f"average {len(TTA_VIEWS)} test-time views: flips and corner crops")
    p.add_argument("--svm", action="store_true", help="also fit an SVM on the pooled features (C, kernel on Valid)")
    p.add_argument("--ood-dir", action="append", default=d["ood_dir"], metavar="DIR",
                   help="photos of your own that are not skin lesions: scored as out-of-distribution (repeatable)")
    p.add_argument("--ood-score", default=d["ood_score"], choices=SCORES,
                   help="gate on this out-of-distribution score (default: the checkpoint's)")
    # at most 100,000 resamples: under 1 GB of draws for all 755 images, intervals steady to the printed digit
    p.add_argument("--bootstrap", type=Number(int, 10, 100_000), default=d["bootstrap"],
                   help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=SEED, default=d["seed"], help="seed of the bootstrap")
    p.add_argument("--out", default=d["out"], help="output folder (default: RUN/test)")
    p.add_argument("--batch-size", type=Number(int, 1), default=d["batch_size"])
    p.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=d["precision"], choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--memory-format", default=d["memory_format"], choices=MEMORY_FORMATS)
    return p.parse_args(argv)


def run(args) -> dict:
    rt = select_runtime(args.device, args.precision, args.memory_format)
    config = dict(vars(args), runtime=rt.describe())
    return evaluate(args.checkpoint, args.out, config, data_root=args.data_root, fold=args.fold, split=args.split,
                    threshold=args.threshold, rt=rt, batch_size=args.batch_size, svm=args.svm, tta=args.tta,
                    resamples=args.bootstrap, seed=args.seed, ood_dirs=args.ood_dir, ood_score=args.ood_score)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
