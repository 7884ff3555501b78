"""Out-of-distribution (OOD) scores: does a photo look like the skin photos the network trained on?

A six-class softmax names one of six conditions for any input, a logo or a cat included, and its
confidence is no measure of distance from the training data. Five scores, each "higher = less like
the training data":

    knn          distance from the L2-normalised penultimate features to their k-th nearest Train
                 image (Sun et al. 2022, "Out-of-distribution detection with deep nearest
                 neighbors"; on OpenOOD v1.5's CIFAR-10 ResNet-18 benchmark the strongest simple
                 method: AUROC 90.6 near-OOD, 93.0 far-OOD)
    energy       -logsumexp of the logits (Liu et al. 2020, "Energy-based out-of-distribution
                 detection"; temperature 1)
    msp          -(maximum softmax probability), calibrated (Hendrycks & Gimpel 2017): the baseline
    mahalanobis  the smallest Mahalanobis distance of the head's input to a class mean of the Train
                 features, with one covariance shared by the classes (Lee et al. 2018), shrunk towards
                 a multiple of the identity (Ledoit & Wolf 2004): 512 dimensions from about 500 images
                 need it
    multilayer   the same distance on the pooled output of each earlier stage too
                 (Classifier.ood_layers: a ResNet's layer2 and layer3, LeNet's two convolutions), each
                 divided by its own distance that keeps 95% of Valid, and the largest of them (Lee et
                 al.'s feature ensemble, unweighted: no OOD images to fit weights on). The one the gate
                 uses: on MSLD v2.0 it tells the generated non-skin pictures from real Test photos with
                 an AUROC of 0.994 against mahalanobis' 0.91 and knn's 0.85 over the five folds of the
                 recipe (LeNet: 0.86 against 0.68; README, "Out of distribution"): noise, flat colours,
                 text or dithered skin tones lie far from skin in the early stages' statistics, where
                 the last stage may map them near a class.

`fit_reference` builds what the scores need from the Train features (stored in best.pt when it is
written, readable with weights_only=True) and the thresholds that keep 95% of the Valid images;
`ood_scores` scores new images from their features and logits. Features are capture_features'
dicts: "head" (the head's input) and one entry per Classifier.ood_layers.
"""
import torch
import torch.nn.functional as F

from getData import DataError, MSLDDataset, usable_folds_root
from models.checkpoint import not_as_written
from models.predict import capture_features, device_logits, logits_and_features, resize_size
from models.runtime import send

SCORES = ("knn", "energy", "msp", "mahalanobis", "multilayer")
GATE_SCORE = "multilayer"
KNN_K = 5  # about 1% of a fold's ~540 Train images (Sun et al. take k = 50 of CIFAR-10's 50,000: 0.1%)
KEEP = 0.95  # the gate keeps 95% of Valid images (Sun et al.'s operating point)


def knn_distance(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each L2-normalised row of `features` to its k-th nearest row of `bank`
    (already normalised): for unit vectors |a - b|^2 = 2 - 2 a.b, so one matrix product."""
    similarity = F.normalize(features.float(), dim=1) @ bank.float().T
    kth = similarity.topk(min(k, len(bank)), dim=1).values[:, -1]
    return (2 - 2 * kth).clamp_min(0).sqrt()


def shrunk_covariance(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf covariance of the rows of `x` (n, p): (1 - s) S + s mu I with the shrinkage s that
    minimises the expected squared error (Ledoit & Wolf 2004, as scikit-learn's LedoitWolf)."""
    x = (x - x.mean(0)).double()
    n, p = x.shape
    sample = x.T @ x / n
    mu = sample.trace() / p
    delta = ((sample - mu * torch.eye(p, dtype=x.dtype)) ** 2).sum() / p
    beta = ((x.pow(2).sum(1) ** 2).sum() / n - (sample ** 2).sum()) / (n * p)
    shrinkage = min(float(beta), float(delta)) / float(delta) if float(delta) > 0 else 1.0
    return ((1 - shrinkage) * sample + shrinkage * mu * torch.eye(p, dtype=x.dtype)).float()


def class_gaussians(features: torch.Tensor, labels: torch.Tensor) -> dict:
    """The class means of `features` and the precision of one shrunk covariance shared by the classes."""
    present = labels.unique()
    means = torch.stack([features[labels == c].mean(0) for c in present])
    within = torch.cat([features[labels == c] - means[i] for i, c in enumerate(present)])
    return dict(class_means=means, precision=torch.linalg.pinv(shrunk_covariance(within), hermitian=True))


def mahalanobis(gaussians: dict, features: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of each row of `features` to its nearest class mean."""
    means, precision = (gaussians[k].to(features.device) for k in ("class_means", "precision"))
    centred = features.float()[:, None, :] - means[None]  # (N, C, F)
    return torch.einsum("ncf,fg,ncg->nc", centred, precision, centred).amin(1)


def fit_reference(train_features: dict, train_labels: torch.Tensor, valid_features: dict,
                  valid_logits: torch.Tensor, temperature: float = 1.0, k: int = KNN_K) -> dict:
    """What the scores need, from the Train images' features, and for each score the threshold that
    keeps KEEP of the Valid images (in-distribution by construction). A dict of tensors, floats and
    strings: best.pt stores it under "ood"."""
    layers = {name: class_gaussians(f.float(), train_labels) for name, f in train_features.items()}
    for name, gaussians in layers.items():  # each stage's distance in units of the one that keeps KEEP of Valid
        distances = mahalanobis(gaussians, valid_features[name]).double()
        gaussians["scale"] = max(float(torch.quantile(distances, KEEP)), 1e-12)  # > 0 even for constant features
    bank = F.normalize(train_features["head"].float(), dim=1).half()  # half the bytes; distances to 1e-3
    reference = dict(score=GATE_SCORE, k=k, temperature=temperature, keep=KEEP, layers=layers, bank=bank)
    valid = ood_scores(reference, valid_features, valid_logits)
    reference["thresholds"] = {name: float(torch.quantile(v.double(), KEEP)) for name, v in valid.items()}
    return reference


def ood_scores(reference: dict, features: dict, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score (higher: less like the Train images) for images with these features
    (capture_features' dict) and logits (float, any device)."""
    logits, head = logits.float(), features["head"].float()
    distances = {name: mahalanobis(g, features[name]) for name, g in reference["layers"].items()}
    scaled = torch.stack([distances[name] / g["scale"] for name, g in reference["layers"].items()])
    return dict(knn=knn_distance(head, reference["bank"].to(head.device), reference["k"]),
                energy=-torch.logsumexp(logits, 1),
                msp=-(logits / reference["temperature"]).softmax(1).amax(1),
                mahalanobis=distances["head"], multilayer=scaled.amax(0))


def gate_by(reference: dict | None, score: str | None) -> dict | None:
    """The reference with its gate on `score` (its stored threshold keeps KEEP of Valid too); None:
    the one the checkpoint chose."""
    return dict(reference, score=score) if reference is not None and score else reference


def gate(reference: dict, features: dict, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gate's score, in-distribution or not) per image: kept when the score is within the
    threshold that keeps KEEP of Valid."""
    score = ood_scores(reference, features, logits)[reference["score"]]
    return score, score <= reference["thresholds"][reference["score"]]


def detection_metrics(in_scores, out_scores) -> dict:
    """How well a score tells OOD images (positive) from in-distribution ones: AUROC, and the false
    positive rate at 95% true positive rate as OOD papers define it (the share of OOD images kept
    when the threshold keeps 95% of in-distribution ones)."""
    in_scores, out_scores = torch.as_tensor(in_scores).double(), torch.as_tensor(out_scores).double()
    # AUROC = P(out > in) + P(out == in) / 2, over every pair (Mann-Whitney)
    greater = (out_scores[:, None] > in_scores[None]).double().mean()
    ties = (out_scores[:, None] == in_scores[None]).double().mean()
    threshold = torch.quantile(in_scores, KEEP)
    return dict(auroc=float(greater + ties / 2), fpr95=float((out_scores <= threshold).double().mean()),
                n_in=len(in_scores), n_out=len(out_scores))


def reference_from_images(model, train_images, train_targets, valid_images, temperature: float, rt) -> dict:
    """fit_reference for an eval-mode classifier, from its fold's decoded Train and Valid images."""
    (valid_logits, valid_features), (_, train_features) = (logits_and_features(model, images, rt)
                                                           for images in (valid_images, train_images))
    return fit_reference(train_features, train_targets, valid_features, valid_logits[0], temperature)


def reference_for(ckpt: dict, model, rt, path, data_root=None, fold=None) -> dict | None:
    """The OOD reference of a classifier checkpoint: the one stored in it, or, for a best.pt written
    before its run finished (train.py adds the reference at the end) or older than this version's
    scores, one computed now from its fold's Train and Valid images when they are at hand (a
    one-line note either way). Without them an older reference that still has every threshold
    gates (it reads fewer stages); None: no gate."""
    stored = ckpt.get("ood")
    if is_current(stored, model):
        return tried(stored, model, rt, path)
    data_root, fold = data_root or ckpt["config"].get("data_root"), fold or ckpt.get("fold")
    note = (f"note: {path} holds no out-of-distribution reference (its run did not finish)" if stored is None
            else f"note: {path}'s out-of-distribution reference is older than this version's scores")
    try:
        root = usable_folds_root(data_root)
        train, valid = (MSLDDataset(root, fold, split, cache_size=resize_size(model.input_size),
                                    classes=ckpt["classes"]) for split in ("Train", "Valid"))
    except (DataError, TypeError):  # no data_root recorded, or its data is gone
        usable = can_gate(stored, model)
        print(f"{note} and its data is not at hand: " + ("the stored one gates" if usable else "no OOD gate"))
        return tried(stored, model, rt, path) if usable else None
    print(f"{note}: computed from fold {fold}'s Train and Valid images")
    return send(reference_from_images(model, train.images, train.targets, valid.images, ckpt.get("temperature") or 1.0,
                                      rt), rt.device)


def tried(reference: dict, model, rt, path) -> dict:
    """A stored reference, placed on the device once (the gate's matrices are not copied per image) and
    tried on one blank image: one whose shapes or numbers do not fit the network (edited by hand,
    damaged) is one line now, not a traceback on every image. Shapes and types are checked as each
    operator is queued, so the trial never waits for the device."""
    reference = send(reference, rt.device)
    blank = torch.zeros(1, 3, model.input_size, model.input_size, dtype=torch.uint8)
    try:
        with capture_features(model) as seen:
            logits = device_logits(model, blank, rt)
        for score in SCORES:
            gate(dict(reference, score=score), seen[0], logits[0])
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        detail = " ".join(str(e).split())[:120]
        raise not_as_written(path, f"its out-of-distribution reference does not fit the network ({detail})") from None
    return reference


def can_gate(reference: dict | None, model) -> bool:
    """A stored reference the network's scores can be computed with: a threshold for every score, and
    statistics of no stage the network does not read."""
    thresholds, layers = (reference or {}).get("thresholds"), (reference or {}).get("layers")
    return (isinstance(thresholds, dict) and set(SCORES) <= set(thresholds)
            and isinstance(layers, dict) and set(layers) <= {"head", *model.ood_layers})


def is_current(reference: dict | None, model) -> bool:
    """One that can gate and holds every stage the network reads (one from before a score or a stage
    was added does not)."""
    return can_gate(reference, model) and set(reference["layers"]) == {"head", *model.ood_layers}
