"""Break the code on purpose and check that a test fails: each mutant below is one small, plausible
bug (a sign, a forgotten step, a check skipped); the tests named beside it must catch it.

    python tests/mutants.py              # every mutant, a table (25 minutes on 2 cores)
    python tests/mutants.py --only 3 7   # those two
    python tests/mutants.py --list

Each mutant is applied to a scratch copy of the repository, never to the working tree, so an
interrupted run leaves nothing broken. Exit status 1 when a mutant passes every test named for it
(a test that cannot fail is a defect) or no longer matches the code it was written against.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (file, the code, the bug put in its place, what the bug is, the tests that must catch it)
MUTANTS = [
    ("simclr.py", "return F.cross_entropy(logits, (anchors + total // 2) % total)",
     "return F.cross_entropy(logits, (anchors + total // 2 + 1) % total)",
     "NT-Xent pairs each view with the wrong partner", "test_simclr.py"),
    ("simclr.py", 'logits = logits.masked_fill(F.one_hot(anchors, total).bool(), float("-inf"))', "pass",
     "NT-Xent counts a view as its own negative", "test_simclr.py"),
    ("simclr.py", "z1, z2 = torch.cat(dist_nn.all_gather(z1)), torch.cat(dist_nn.all_gather(z2))",
     "z1, z2 = (torch.cat([t if i == dist.get_rank() else t.detach() for i, t in enumerate(dist_nn.all_gather(z))])"
     " for z in (z1, z2))", "other ranks' negatives gathered without their gradients", "test_simclr.py"),
    ("simclr.py", "    second = aug.draw(gen, shape)\n", "    second = first\n", "SimCLR's two views drawn alike",
     "test_simclr.py"),
    ("simclr.py", "votes = F.one_hot(train_y[nearest], int(train_y.max()) + 1).sum(1)",
     "votes = F.one_hot(train_y[nearest[:, :1]], int(train_y.max()) + 1).sum(1)",
     "the k-NN monitor votes with the nearest alone", "test_simclr.py"),
    ("simclr.py", "logits = z[anchors] @ z.T / temperature", "logits = z[anchors] @ z.T / 0.5",
     "NT-Xent's temperature argument ignored", "test_simclr.py"),
    ("simclr.py", 'partners = patient_partners(files, splits) if cfg["positives"] == "patient" else None',
     "partners = None", "--positives patient ignored", "test_simclr.py"),
    ("models/optim.py", "torch._foreach_lerp_(self._floats[0], self._floats[1], 1 - d)",
     "torch._foreach_lerp_(self._floats[0], self._floats[1], d)", "EMA weighs the new weights by the decay",
     "test_models.py"),
    ("models/optim.py", "d = min(self.decay, (1 + self.updates) / (10 + self.updates))", "d = self.decay",
     "EMA without its warm-up", "test_models.py"),
    ("models/optim.py", "torch._foreach_copy_(self._ints[0], self._ints[1])", "pass",
     "EMA leaves integer buffers behind", "test_models.py"),
    ("models/optim.py", "dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]",
     "dict(params=[p for p in params if p.ndim <= 1], weight_decay=weight_decay)]", "weight decay on norms and biases",
     "test_models.py"),
    ("models/optim.py", "            return (step + 1) / warmup_steps", "            return step / warmup_steps",
     "warm-up starts at a learning rate of 0", "test_train.py"),
    ("models/optim.py", "trust = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(w_norm))",
     "trust = torch.ones_like(w_norm)", "LARS without its trust ratio", "test_simclr.py"),
    ("models/optim.py", 'grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))', "pass",
     "LARS without weight decay", "test_models.py"),
    ("models/predict.py", "return float(log_t.detach().exp())", "return 1.0", "temperature scaling fits nothing",
     "test_models.py"),
    ("models/predict.py", 'TTA_VIEWS = (("center", ""), ("center", "h"), ("center", "v"),',
     'TTA_VIEWS = (("center", ""), ("center", "h"), ("center", "h"),', "two TTA views the same", "test_models.py"),
    ("models/predict.py", "    return (x - mean).div_(std)\n", "    return x - mean\n",
     "evaluation normalises without the std", "test_augment.py"),
    ("models/predict.py", 'top = {"top": 0, "bottom": h - size}.get(where.split("-")[0], (h - size) // 2)',
     'top = {"top": 0, "bottom": h - size}.get(where.split("-")[0], 0)', "the centre crop taken at the top",
     "test_models.py"),
    ("models/runtime.py", "    np.random.seed(seed % 2**32)\n", "", "set_seed leaves NumPy unseeded", "test_models.py"),
    ("models/runtime.py", "    torch.manual_seed(derived_seed(*key, rank + 1, 2**31))", "    pass",
     "dropout's stream not seeded per epoch (--resume draws otherwise)", "test_train.py"),
    ("models/runtime.py", "return idx[rt.rank * per:(rt.rank + 1) * per]", "return idx[:per]",
     "every rank trains on the same share of a batch", "test_train.py"),
    ("models/runtime.py", "order = torch.multinomial(sample_weights, n, replacement=True, generator=gen)",
     "order = torch.randint(n, (n,), generator=gen)", "the class-balanced sampler ignores its weights",
     "test_models.py"),
    ("models/predict.py", "return (logits / temperature).softmax(-1).mean(0)",
     "return (logits * temperature).softmax(-1).mean(0)", "the temperature multiplies the logits", "test_models.py"),
    ("models/checkpoint.py", "        module.load_state_dict(state)\n",
     "        module.load_state_dict(state, strict=False)\n",
     "weights that do not fit loaded in part (also by --resume)", "test_refusals.py"),
    ("models/ood.py", 'reference["thresholds"] = {name: float(torch.quantile(v.double(), KEEP))',
     'reference["thresholds"] = {name: float(torch.quantile(v.double(), 0.9))', "the gate keeps 90% of Valid",
     "test_ood.py"),
    ("models/ood.py", "energy=-torch.logsumexp(logits, 1),", "energy=torch.logsumexp(logits, 1),",
     "the energy score the wrong way round", "test_ood.py"),
    ("models/ood.py", 'msp=-(logits / reference["temperature"]).softmax(1).amax(1),',
     "msp=-logits.softmax(1).amax(1),", "MSP without the calibrated temperature", "test_ood.py"),
    ("models/ood.py", 'torch.einsum("ncf,fg,ncg->nc", centred, precision, centred).amin(1)',
     'torch.einsum("ncf,fg,ncg->nc", centred, precision, centred).mean(1)',
     "Mahalanobis to the mean class, not the nearest", "test_ood.py"),
    ("models/ood.py", "kth = similarity.topk(min(k, len(bank)), dim=1).values[:, -1]",
     "kth = similarity.topk(min(k, len(bank)), dim=1).values[:, 0]", "kNN reads the nearest, not the k-th",
     "test_ood.py"),
    ("models/ood.py", "similarity = F.normalize(features.float(), dim=1) @ bank.float().T",
     "similarity = features.float() @ bank.float().T", "kNN's queries not L2-normalised", "test_ood.py"),
    ("models/ood.py", "within = torch.cat([features[labels == c] - means[i] for i, c in enumerate(present)])",
     "within = features - features.mean(0)", "Mahalanobis with the pooled, not the within-class, covariance",
     "test_ood.py"),
    ("gradcam.py", "return torch.trapezoid(curves, dx=1 / (curves.shape[1] - 1), dim=1)", "return curves.mean(1)",
     "deletion/insertion areas as a mean", "test_gradcam.py"),
    ("gradcam.py", "ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)", "pass",
     "Spearman without centring the ranks", "test_gradcam.py"),
    ("gradcam.py", "cam = F.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))",
     "cam = (grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True).abs()", "Grad-CAM without its ReLU",
     "test_gradcam.py"),
    ("gradcam.py", "torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), self.input)",
     "torch.autograd.grad(logits[:, target[0]].sum(), self.input)", "a batch explains its first photo's class",
     "test_gradcam.py"),
    ("gradcam.py", "return (maps.cpu() + jitter).flatten(1).argsort(1, descending=True)",
     "return (maps.cpu() + jitter).flatten(1).argsort(1, descending=False)",
     "deletion removes the least important pixels first", "test_gradcam.py"),
    ("gradcam.py", '    return [("head", model.head)] + blocks[::-1]\n', '    return [("head", model.head)] + blocks\n',
     "the randomisation cascades bottom-up", "test_gradcam.py"),
    ("augment.py", "x = x.lerp(x[perm], 1 - lam)", "x = x.lerp(x[perm], lam)", "MixUp mixes the pixels the wrong way",
     "test_augment.py"),
    ("augment.py", "return x, target.mul(lam).add_(target[perm.to(target.device)], alpha=1 - lam)",
     "return x, target", "MixUp/CutMix leave the labels unmixed", "test_augment.py"),
    ("augment.py", "lam=1 - (bottom - top) * (right - left) / (height * width))", "lam=lam)",
     "CutMix's lambda ignores the clipped box", "test_augment.py"),
    ("augment.py", 'fy = torch.where(_coin(gen, n, vflip["p"]), -one, one) if vflip else one', "fy = one",
     "no vertical flips", "test_augment.py"),
    ("augment.py", "sign = torch.where(_coin(gen, n, 0.5) & signed, -1.0, 1.0)", "sign = torch.ones(n)",
     "TrivialAugment's signed operations one way only", "test_augment.py"),
    ("augment.py", "mean, std = constant(MEAN, x.device, x.dtype, (3, 1)), constant(STD, x.device, x.dtype, (3, 1))",
     "mean, std = constant(STD, x.device, x.dtype, (3, 1)), constant(MEAN, x.device, x.dtype, (3, 1))",
     "training's colour pass normalises with mean and std swapped", "test_augment.py"),
    ("augment.py", '    if normalized and not (pixel and pixel[-1] == "color"):\n        x = normalize(x)\n', "",
     "training batches without a colour pass left unnormalised", "test_augment.py"),
    ("getData.py", "distance = bits @ (1 - bits).T + (1 - bits) @ bits.T", "distance = bits @ (1 - bits).T",
     "half a Hamming distance", "test_getData.py"),
    ("getData.py", "if len(patients) < 2 and not split_folds:", "if len(patients) < 2:",
     "a near-duplicate of one patient in two splits let through", "test_getData.py"),
    ("getData.py", 'for a, b in (("Train", "Valid"), ("Train", "Test"), ("Valid", "Test")):',
     'for a, b in (("Train", "Valid"), ("Train", "Test")):', "patients shared by Valid and Test unchecked",
     "test_getData.py"),
    ("getData.py", "    factor = min(im.size) // side\n", "    factor = max(im.size) // side\n",
     "photos shrunk below the size asked", "test_getData.py"),
    ("getData.py", "im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)",
     "im = im.resize((size, size), Image.Resampling.BILINEAR)", "the cache squashes photos instead of cropping",
     "test_getData.py"),
    ("getData.py", "return _to_rgb(ImageOps.exif_transpose(_shrink(im, shrink_to) if shrink_to else im))",
     "return _to_rgb((_shrink(im, shrink_to) if shrink_to else im).copy())", "EXIF orientation ignored",
     "test_getData.py"),
    ("getData.py", "if is_link or os.path.isabs(m.filename) or not (root / m.filename).resolve().is_relative_to(root):",
     "if is_link or os.path.isabs(m.filename):", "an archive's '..' member extracted", "test_getData.py"),
    ("getData.py", "if is_link or os.path.isabs(m.filename) or not (root / m.filename).resolve().is_relative_to(root):",
     "if os.path.isabs(m.filename) or not (root / m.filename).resolve().is_relative_to(root):",
     "an archive's link extracted", "test_getData.py"),
    ("testing.py", "ECE_BINS = 15", "ECE_BINS = 10", "ECE over other bins than Guo et al.'s", "test_testing.py"),
    ("testing.py", "return np.bincount(np.asarray(y_true) * num_classes + np.asarray(y_pred),",
     "return np.bincount(np.asarray(y_pred) * num_classes + np.asarray(y_true),", "the confusion matrix transposed",
     "test_testing.py"),
    ("testing.py", "    covered = probs.max(1) >= threshold\n", "    covered = probs.max(1) > threshold\n",
     "the gate turns away a photo at its threshold", "test_testing.py"),
    ("testing.py", "test_sensitivity=float(np.mean(p[y == positive] >= t))",
     "test_sensitivity=float(np.mean(p[y == positive] > t))", "the Mpox operating point strict on Test only",
     "test_testing.py"),
    ("testing.py", "low, high = np.nanpercentile(samples[:, defined], [2.5, 97.5], axis=0)",
     "low, high = np.nanpercentile(samples[:, defined], [5, 95], axis=0)", "a 90% interval called 95%",
     "test_testing.py"),
    ("testing.py", "    views = TTA_VIEWS if tta else PLAIN_VIEW\n", "    views = PLAIN_VIEW\n", "--tta ignored",
     "test_testing.py"),
    ("testing.py", "balanced_accuracy=_ratio((recall * present).sum(-1), present.sum(-1)),",
     "balanced_accuracy=recall.mean(-1),", "balanced accuracy over absent classes too", "test_testing.py"),
    ("testing.py", "specificity=_ratio(total - support - predicted + tp, total - support))",
     "specificity=_ratio(total - predicted, total - support))", "specificity miscounted", "test_testing.py"),
    ("testing.py", "counts = np.random.default_rng(seed).multinomial(len(names), np.full(len(names), 1 / len(names)), "
     "size=resamples)", "counts = np.ones((resamples, len(names)), dtype=int)", "a bootstrap that resamples nothing",
     "test_testing.py"),
    ("testing.py", "cms = (counts[:, inverse] @ np.eye(num_classes ** 2)[cell])",
     "cms = (counts[:, np.arange(len(cell)) % len(names)] @ np.eye(num_classes ** 2)[cell])",
     "the bootstrap draws photos, not patients", "test_testing.py"),
    ("train.py", "        nn.utils.clip_grad_norm_(step.net.parameters(), step.clip_grad)", "        pass",
     "--clip-grad ignored", "test_train.py"),
    ("train.py", "label_smoothing=label_smoothing)", "label_smoothing=0.0)", "--label-smoothing ignored",
     "test_train.py"),
    ("train.py", "    return w / w[counts > 0].mean()", "    return w", "class weights not scaled to mean 1",
     "test_train.py"),
    ("train.py", "    return w / w[counts > 0].mean()", "    return w / w.mean()",
     "class weights scaled over absent classes too", "test_train.py"),
    ("train.py", 'loss_fn = nn.CrossEntropyLoss(weight=weights.to(rt.device) if balance == "loss" else None,',
     "loss_fn = nn.CrossEntropyLoss(weight=None,", "--balance loss ignored", "test_train.py"),
    ("train.py", 'warmup_cosine(cfg["epochs"] * steps, cfg["warmup_epochs"] * steps))',
     'warmup_cosine(cfg["epochs"] * steps, cfg["warmup_epochs"]))', "--warmup-epochs counted in steps",
     "test_train.py"),
    ("train.py", "order_gen, aug_gen = epoch_generators(key, rt.rank)",
     "order_gen, aug_gen = epoch_generators(key[:1], rt.rank)", "every epoch the same batches and views",
     "test_train.py"),
    ("train.py", "    if rt.world > 1:\n        dist.all_reduce(total)\n", "",
     "under DDP the train loss is rank 0's alone", "test_train.py"),
    ("train.py", 'return best is None or (new["valid_bal_acc"], -new["valid_loss"]) > (best["valid_bal_acc"], '
     '-best["valid_loss"])', 'return best is None or -new["valid_loss"] > -best["valid_loss"]',
     "best.pt chosen on Valid loss, not balanced accuracy", "test_train.py"),
    ("train.py", "run.end(row, model, ema.module if ema else model, started, opt, sched, **kept)",
     "run.end(row, model, model, started, opt, sched, **kept)", "--ema: the raw weights validated and kept",
     "test_train.py"),
    ("train.py", "temperature=fit_temperature(logits, self.data.valid_targets)),", "temperature=1.0),",
     "best.pt without its fitted temperature", "test_train.py"),
    ("train.py", "    return [c for c in classes if c != exclude]", "    return classes", "--exclude-class ignored",
     "test_ood.py"),
    ("train.py", "prox = (lambda: mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))) if mu else None",
     "prox = None", "FedProx without its proximal term", "test_federated_svm.py"),
    ("train.py", "out[k] = (mean.round() if not ref.is_floating_point() else mean).to(ref.dtype)",
     "out[k] = states[0][k]", "FedAvg keeps the first site's weights", "test_federated_svm.py"),
    ("train.py", "    w = w / w.sum()\n", "    w = torch.full_like(w, 1 / len(w))\n", "FedAvg unweighted by site size",
     "test_federated_svm.py"),
    ("models/checkpoint.py", 'torch.load(path, map_location="cpu", weights_only=True,',
     'torch.load(path, map_location="cpu", weights_only=False,', "checkpoints unpickled with code",
     "test_refusals.py"),
    ("models/rundir.py", "    if not _try_lock(handle):", "    if False:", "two runs into one folder",
     "test_refusals.py"),
    ("serve.py", "                self.free += nbytes", "                pass", "the decode budget never given back",
     "test_serve.py"),
    ("serve.py", "for (_, _, future), result in zip(batch, results):",
     "for (_, _, future), result in zip(batch, results[::-1]):", "a batch's answers sent to the wrong requests",
     "test_serve.py"),
    ("serve.py", '        if result["in_distribution"] is False:\n', "        if False:\n",
     "a photo the gate turns away still gets a diagnosis", "test_ood.py"),
    ("serve.py", "            if found is not None:\n", "            if False:\n",
     "a second photo in one request ignored", "test_serve.py"),
    ("serve.py", 'ours = name == "localhost" or name.endswith(".localhost")', "ours = True",
     "any Host answered on loopback (DNS rebinding)", "test_serve.py"),
]


def scratch_copy(into: Path) -> Path:
    """The repository's code and tests, without its runs, data or environment."""
    return Path(shutil.copytree(REPO, into / "repo", ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "data", "gpu", "__pycache__", "*.pt")))


def run_mutant(repo: Path, mutant) -> tuple[str, str]:
    """(verdict, detail): caught (the first failing test), NOT CAUGHT, or STALE (the code has changed)."""
    file, code, bug, _, tests = mutant
    path = repo / file
    source = path.read_text()
    if source.count(code) != 1:
        return "STALE", f"{file} holds {source.count(code)} copies of the code, not 1: update this mutant"
    path.write_text(source.replace(code, bug))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               *(f"tests/{t}" for t in tests.split())], cwd=repo, capture_output=True, text=True)
    finally:
        path.write_text(source)
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in proc.stdout.splitlines()
              if line.startswith(("FAILED", "ERROR"))]
    return ("caught", failed[0] if failed else f"pytest exit {proc.returncode}") if proc.returncode else \
        ("NOT CAUGHT", f"{tests} pass")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=int, nargs="+", metavar="N", help="these mutants (numbers from --list)")
    p.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = p.parse_args(argv)
    if unknown := sorted(set(args.only or ()) - set(range(len(MUTANTS)))):
        p.error(f"--only {' '.join(map(str, unknown))}: no such mutant (0 to {len(MUTANTS) - 1}; see --list)")
    chosen = [(i, m) for i, m in enumerate(MUTANTS) if not args.only or i in args.only]
    if args.list:
        for i, (file, _, _, what, tests) in chosen:
            print(f"{i:3d}  {file:22s} {what}  [{tests}]")
        return 0
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = scratch_copy(Path(tmp))
        print("| # | file | bug | verdict | by | s |\n|---|---|---|---|---|---|", flush=True)
        for i, mutant in chosen:
            t0 = time.perf_counter()
            verdict, detail = run_mutant(repo, mutant)
            verdicts.append(verdict)
            print(f"| {i} | {mutant[0]} | {mutant[3]} | {verdict} | {detail} | {time.perf_counter() - t0:.0f} |",
                  flush=True)
    print(f"\n{verdicts.count('caught')} of {len(verdicts)} mutants caught")
    return 0 if verdicts.count("caught") == len(verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
