import json
import signal

import pytest
import torch
from torchvision.transforms import v2

import augment

from augment import (OFFLINE_OPS, OP_NAMES, SIMCLR_OPS, TRAIN_OPS, TRIVIAL_OPS, TRIVIAL_TRAIN_OPS, BatchAugment,
                     TrivialAugment, augment_batch, geometric, mix_batch, simclr_transform, train_transform,
                     write_augmented)
from conftest import (assert_one_line_error, at_once, ctrl_c_as_from_a_terminal, interrupt_when, run_cli,
                      start_as_from_a_terminal, start_in_the_background)
from getData import DataError, WriteError, index_split, list_classes, load_image, origin_stem, prepare
from models import MEAN, STD, resize_size, to_input


def _batch(n=6, h=40, w=40, seed=0):
    return torch.rand((n, 3, h, w), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_keeps_shape_dtype_and_range(name):
    x = _batch(h=36, w=52)
    y = augment_batch(x, torch.Generator().manual_seed(1), {name: {**OFFLINE_OPS[name], "p": 1.0}})
    assert y.shape == x.shape and y.dtype == x.dtype
    assert 0 <= y.min() and y.max() <= 1
    assert not torch.equal(y, x)  # with p=1 every op changes the image


@pytest.mark.parametrize("ops", [TRAIN_OPS, SIMCLR_OPS])
def test_batch_augment_output_and_determinism(ops):
    x = (_batch(8, 42, 42) * 255).to(torch.uint8)
    aug = BatchAugment(36, ops)
    a, b = aug(x, torch.Generator().manual_seed(5)), aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert a.shape == (8, 3, 36, 36) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_affine_grid_equals_torch():
    import torch.nn.functional as F
    from augment import affine_grid
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    for h, w in ((7, 9), (32, 32)):
        assert torch.allclose(affine_grid(theta, h, w), F.affine_grid(theta, [5, 3, h, w], align_corners=False),
                              atol=1e-6)


def test_geometry_is_exact_for_identity_and_flips():
    x = _batch(4, 20, 30)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(geometric(x, g), x, atol=1e-5)
    assert torch.allclose(geometric(x, g, hflip={"p": 1.0}), x.flip(-1), atol=1e-5)
    assert torch.allclose(geometric(x, g, vflip={"p": 1.0}), x.flip(-2), atol=1e-5)
    assert torch.allclose(geometric(x, g, hflip={"p": 0.0}, vflip={"p": 0.0}), x, atol=1e-5)


def test_crop_takes_a_region_not_the_whole_image():
    x = torch.zeros(1, 3, 64, 64)
    x[..., :32, :] = 1.0  # top half white
    crops = geometric(x.expand(200, -1, -1, -1), torch.Generator().manual_seed(0),
                      crop={"scale": (0.1, 0.1), "ratio": (1.0, 1.0)})
    means = crops.mean((1, 2, 3))
    assert (means > 0.99).any() and (means < 0.01).any()  # small crops land wholly in either half


def _summary(batch):
    """Channel means, channel stds, spread of the means across samples, and both flip rates."""
    means, stds = batch.mean((2, 3)), batch.std((2, 3))
    half_w, half_h = batch.shape[-1] // 2, batch.shape[-2] // 2
    left = batch[..., :half_w].mean((1, 2, 3)) > batch[..., half_w:].mean((1, 2, 3))
    top = batch[..., :half_h, :].mean((1, 2, 3)) > batch[..., half_h:, :].mean((1, 2, 3))
    sides = torch.stack([left.float().mean(), top.float().mean()])
    return torch.cat([means.mean(0), stds.mean(0), means.std(0), sides])


def test_batch_path_matches_torchvision_distribution():
    """The GPU path and the per-image torchvision path draw from the same distribution.

    Calibrated: the gap is <= 0.015 on these statistics (flip rates: binomial noise, <= 0.035),
    while colour jitter 0.3 instead of 0.2 moves the spread by 0.11 and crop scale 0.4 the stds by 0.06.
    """
    img = _gradient()
    n = 1500
    torch.manual_seed(0)
    tv = train_transform(32)
    a = _summary(torch.stack([tv(img) for _ in range(n)]))
    b = _summary(BatchAugment(32)(img.expand(n, -1, -1, -1), torch.Generator().manual_seed(0)))
    assert torch.allclose(a[:9], b[:9], atol=0.03), (a, b)
    assert torch.allclose(a[9:], b[9:], atol=0.05), (a, b)
    assert torch.allclose(b[9:], torch.tensor([0.5, 0.5]), atol=0.05)  # flips happen half the time


@pytest.mark.parametrize("name", list(augment.TRAIN_AUGMENTS))
def test_every_training_augmentation_normalises_as_evaluation_does(name):
    """Whatever a batch's last operation (colour jitter folds the normalisation into its matrix, the
    others normalise after it), the network trains on the scale it is evaluated on: pixels in [0, 1]
    in training and normalised ones in testing would test it on another distribution."""
    cached = _gradient(side=resize_size(32))[None].expand(400, -1, -1, -1)
    trained = BatchAugment(32, augment.TRAIN_AUGMENTS[name])(cached, torch.Generator().manual_seed(0))
    seen = to_input(cached[:1], 32)
    assert torch.allclose(trained.mean((0, 2, 3)), seen.mean((0, 2, 3)), atol=0.1)
    ratio = trained.std((0, 2, 3)) / seen.std((0, 2, 3))
    assert ((ratio > 0.8) & (ratio < 1.5)).all(), ratio  # crops and colour spread it a little


def _gradient(side=48, texture=0.0):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    img = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.5 * (xx + yy)])
    img = img + texture * torch.sin(40 * xx) * torch.sin(40 * yy)  # detail for sharpness to act on
    return (img.clamp(0, 1) * 255).to(torch.uint8)


@pytest.mark.parametrize("op", [k for k in TRIVIAL_OPS if k != "identity"])
def test_trivial_ops_match_torchvision_per_op(op):
    """Each TrivialAugment op, forced, draws the same distribution in the batched and per-image paths
    (statistics of the central region: the batched path reflects at the border, torchvision fills)."""
    img = _gradient(texture=0.15)
    ops = {op: TRIVIAL_OPS[op]}
    n = 600
    torch.manual_seed(0)
    tv = TrivialAugment(ops)
    a = torch.stack([tv(img.float() / 255) for _ in range(n)])
    b = augment_batch(img.float().div(255).expand(n, -1, -1, -1), torch.Generator().manual_seed(0), {"trivial": ops})
    inner = (slice(None), slice(None), slice(18, 30), slice(18, 30))
    sa, sb = _summary(a[inner]), _summary(b[inner])
    assert torch.allclose(sa[:9], sb[:9], atol=0.03), (op, sa, sb)
    changed = (b - img.float() / 255).abs().amax((1, 2, 3)) > 1 / 255
    assert changed.float().mean() > 0.5  # the op does act, at random strengths


def test_trivial_picks_one_op_of_random_strength_per_image():
    img = _gradient().float().div(255).expand(400, -1, -1, -1)
    out = augment_batch(img, torch.Generator().manual_seed(0), {"trivial": TRIVIAL_OPS})
    same = (out - img).abs().amax((1, 2, 3)) < 1e-5
    share = same.float().mean().item()  # identity (1 op in 12), or a strength drawn near 0
    assert 0.03 < share < 0.2
    train = BatchAugment(32, TRIVIAL_TRAIN_OPS)(_gradient().expand(8, -1, -1, -1), torch.Generator().manual_seed(1))
    assert train.shape == (8, 3, 32, 32)


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixed_labels_sum_to_one_and_follow_the_pixels(mixup, cutmix):
    g = torch.Generator().manual_seed(3)
    y = torch.arange(8)  # image i is the constant i, of class i
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 16)
    for _ in range(20):
        mixed, target = mix_batch(x, y, 8, g, mixup, cutmix)
        assert target.shape == (8, 8) and torch.allclose(target.sum(1), torch.ones(8))
        # an image's own label keeps the share lambda of its pixels, its partner's label the rest:
        # the mean pixel must be lambda * i + (1 - lambda) * partner
        lam, partner = target[y, y], (target - torch.diag(target.diagonal())).argmax(1).float()
        expected = lam * y + (1 - lam) * torch.where(lam < 1, partner, y.float())
        assert torch.allclose(mixed.mean((1, 2, 3)), expected, atol=1e-4)
    plain_x, plain_y = mix_batch(x, y, 8, g)
    assert plain_x is x and torch.equal(plain_y, y)  # off: the batch and its class indices, unchanged


def test_simclr_views_differ_and_eval_matches_an_independent_reference(synthetic):
    im = load_image(next((synthetic / "fold1" / "Train" / "Cowpox").iterdir()))
    v1, v2_ = simclr_transform(32)(im)
    assert v1.shape == v2_.shape == (3, 32, 32) and not torch.equal(v1, v2_)
    ours = to_input(prepare(im, resize_size(32))[None], 32)[0]
    ref = v2.Compose([v2.ToImage(), v2.Resize(resize_size(32), antialias=True), v2.CenterCrop(resize_size(32)),
                      v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])(im)
    assert ours.shape == ref.shape and (ours - ref).abs().mean() < 0.1  # resampling differs, not the geometry
    assert (ours - ref.flip(-1)).abs().mean() > 2 * (ours - ref).abs().mean()  # (the test sees a wrong crop)


# ----------------------------------------------------------------------------- offline writer
def _train_origins(root, fold=1):
    return {p.stem: list_classes(root)[y] for p, y in index_split(root, fold, "Train")}


def test_writer_factor_counts_names_and_never_valid_test(tmp_path, synthetic):
    out = tmp_path / "aug"
    counts = write_augmented(synthetic, 1, out, factor=2, ops="hflip,noise", workers=1)
    origins = _train_origins(synthetic)
    written = sorted(out.rglob("*.jpg"))
    assert len(written) == 2 * len(origins) == sum(counts.values())
    held_out = {p.stem for s in ("Valid", "Test") for p, _ in index_split(synthetic, 1, s)}
    for p in written:
        assert origin_stem(p) in origins and origins[origin_stem(p)] == p.parent.name
        assert origin_stem(p) not in held_out
    assert load_image(written[0]).size == load_image(next(synthetic.rglob(f"{origin_stem(written[0])}.jpg"))).size
    config = json.loads((out / "config.json").read_text())  # what made them
    assert (config["fold"], config["factor"], config["ops"], config["seed"]) == (1, 2, "hflip,noise", 0)
    assert config["counts"] == counts


def test_writer_is_deterministic(tmp_path, synthetic):
    a = write_augmented(synthetic, 2, tmp_path / "a", factor=1, seed=3, workers=2)
    write_augmented(synthetic, 2, tmp_path / "b", factor=1, seed=3, workers=1)
    assert sum(a.values()) == len(index_split(synthetic, 2, "Train")) == len(list((tmp_path / "a").rglob("*.jpg")))
    for p in (tmp_path / "a").rglob("*.jpg"):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()


def test_ctrl_c_or_sigterm_stops_the_writer_and_its_processes_in_one_line(tmp_path, synthetic):
    """As a user runs it, in a fresh interpreter with the workers it spawns (torch warns once per
    process, so only new ones can show a warning: PyTorch's "NumPy array is not writable" came once
    per worker), once they write: a terminal's Ctrl-C, or `kill PID` of a writer started with `nohup
    ... &` (before, its hidden temporary folder of half the copies stayed behind), gives one line and
    nothing else on stderr, exit status 130 or 143, no process left, and no output folder (it appears
    whole or not at all). Both writers at once: each is mostly torch imports."""
    def stop(sig):
        (tmp_path / sig.name).mkdir()
        start = start_as_from_a_terminal if sig == signal.SIGINT else start_in_the_background
        proc = start("augment.py", "--data-root", synthetic, "--out", tmp_path / sig.name / "aug", "--factor", 100,
                     "--workers", 2)
        lines = interrupt_when(proc, lambda: any((tmp_path / sig.name).rglob("*.jpg")),  # the workers write
                               whole_group=sig == signal.SIGINT, sig=sig)
        return proc.returncode, lines, list((tmp_path / sig.name).iterdir())

    interrupted, terminated = at_once(stop, [signal.SIGINT, signal.SIGTERM])
    assert interrupted == (130, ["interrupted"], []), interrupted
    assert terminated == (143, ["terminated"], []), terminated


class _CtrlCProbe(torch.utils.data.Dataset):
    """Whether the process that loads an item ignores Ctrl-C."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_the_writers_and_the_benchmarks_workers_are_born_deaf_to_ctrl_c():
    """Ctrl-C is the parent's to handle: a worker that took it while importing torch (its first
    seconds) printed a traceback, when the parent's stop of the pool did not kill it first (a race
    the test above cannot force). Ignored from birth, the workers report SIGINT ignored."""
    with ctrl_c_as_from_a_terminal():
        assert list(augment._in_processes(signal.getsignal, [signal.SIGINT] * 2, 2)) == [signal.SIG_IGN] * 2
        assert [batch.tolist() for batch in augment._loader(_CtrlCProbe(), 2, 1)] == [[True, True]]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the parent's is back


def test_writer_balance_tops_up_to_largest_class(tmp_path, synthetic):
    counts = write_augmented(synthetic, 1, tmp_path / "bal", balance=True, workers=1)
    have = {c: 0 for c in counts}
    for c in _train_origins(synthetic).values():
        have[c] += 1
    target = max(have.values())
    assert all(have[c] + counts[c] == target for c in have)
    assert counts[max(have, key=have.get)] == 0


def test_writer_bad_arguments(tmp_path, synthetic):
    with pytest.raises(DataError, match="unknown operation rotate"):
        write_augmented(synthetic, 1, tmp_path / "x", factor=1, ops="hflip,rotate")
    with pytest.raises(DataError, match="--factor 0"):
        write_augmented(synthetic, 1, tmp_path / "x", factor=0)
    with pytest.raises(WriteError, match="inside the dataset"):
        write_augmented(synthetic, 1, synthetic / "fold1" / "Train" / "extra", factor=1)
    assert not (tmp_path / "x").exists()


def test_writer_cli_errors_are_one_line(tmp_path, synthetic):
    base = ("augment.py", "--data-root", synthetic, "--fold", "1")
    assert_one_line_error(run_cli(*base, "--out", tmp_path / "o", "--ops", "sharpen"), "unknown operation")
    assert_one_line_error(run_cli(*base, "--out", tmp_path / "o", "--factor", "0"), "--factor 0: out of range")
    assert_one_line_error(run_cli(*base, "--out", tmp_path / "o", "--factor", "10000000000"),  # a list that filled
                          "--factor 10000000000: out of range")  # the memory before a copy was written
    assert_one_line_error(run_cli(*base, "--out", synthetic / "aug"), f"inside the dataset {synthetic}")
    assert_one_line_error(run_cli(*base, "--out", tmp_path / "o", "--fold", "9"), "--fold", "9")


@pytest.mark.parametrize("small_disk", [2000], indirect=True)
def test_copies_that_would_not_fit_on_the_disk_are_refused_before_the_first(small_disk, synthetic):
    """Before, the writer filled the disk (for every program on it) and only then refused."""
    train_bytes = sum(p.stat().st_size for p, _ in index_split(synthetic, 1, "Train"))
    assert train_bytes < 2_000_000 < 5 * train_bytes  # one copy of each fits on the 2 MB disk; five do not
    proc = run_cli("augment.py", "--data-root", synthetic, "--out", small_disk / "aug", "--factor", 5)
    assert_one_line_error(proc, f"--out {small_disk / 'aug'}: writing", "free some space or choose another --out")
    assert list(small_disk.iterdir()) == []
    assert write_augmented(synthetic, 1, small_disk / "aug", factor=1, workers=1)  # what fits is written


def test_color_matches_torchvision_formulas():
    import torchvision.transforms.v2.functional as TF
    from augment import _coin, _uniform, color
    x = 0.3 + 0.4 * _batch(3, 16, 16)  # no step pushes a pixel out of [0, 1]: the single final clamp is exact
    draw = torch.Generator().manual_seed(4)
    _coin(draw, 3, 1.0)
    b, c, s = (_uniform(draw, 3, 1 - v, 1 + v) for v in (0.2, 0.2, 0.2))
    ours = color(x, torch.Generator().manual_seed(4), 0.2, 0.2, 0.2)
    for i in range(3):
        ref = TF.adjust_contrast(TF.adjust_brightness(x[i], float(b[i])), float(c[i]))
        ref = TF.adjust_saturation(ref, float(s[i]))
        assert torch.allclose(ours[i], ref, atol=1e-5)


def test_benchmark_prints_the_input_pipeline_table(synthetic):
    proc = run_cli("augment.py", "--benchmark", "--data-root", synthetic, "--size", 32, "--batch-size", 16,
                   "--workers", 1, "--augment", "trivial")
    assert proc.returncode == 0, proc.stderr
    rows = {line[:44].strip(): line[44:].strip() for line in proc.stdout.splitlines() if "BatchAugment" in line
            or "DataLoader" in line}
    assert float(rows["DataLoader + PIL decode + torchvision v2"]) > 0
    assert float(rows["uint8 cache on CPU + BatchAugment"]) > 0 and "--augment trivial" in proc.stdout


def test_a_flag_of_the_other_mode_is_one_line(synthetic, tmp_path):
    """The writer's flags with --benchmark, the benchmark's without it, and --factor beside --balance were
    each ignored without a word."""
    for args, said in ((("--benchmark", "--factor", 2), "--factor 2 is not used by --benchmark"),
                       (("--benchmark", "--out", tmp_path / "a"), f"--out {tmp_path / 'a'} is not used by"),
                       (("--size", 112, "--out", tmp_path / "b"), "--size 112 is the benchmark's"),
                       (("--augment", "trivial", "--out", tmp_path / "c"), "--augment trivial is the benchmark's"),
                       (("--balance", "--factor", 3, "--out", tmp_path / "d"), "--factor 3 is not used by --balance")):
        assert_one_line_error(run_cli("augment.py", "--data-root", synthetic, *args), said)
    assert not list(tmp_path.iterdir())
