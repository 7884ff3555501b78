import http.server
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import getData
from conftest import assert_one_line_error, ctrl_c_as_from_a_terminal, run_cli, serving, signal_in_a_finalizer
from getData import (FOLDS, SPLITS, DataError, MSLDDataset, audit, find_folds_root, images_under, index_split,
                     list_classes, load_image, make_synthetic, origin_stem, patient_id)

CLASSES = ["Chickenpox", "Cowpox", "HFMD", "Healthy", "Measles", "Monkeypox"]


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("layout", ["Original Images/Original Images/FOLDS", "Original Images/FOLDS", "FOLDS",
                                    "MSLD v2.0/Original Images/Original Images/FOLDS"])
def test_finds_every_unzip_layout(tmp_path, synthetic, layout):
    target = tmp_path / layout
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(synthetic, target_is_directory=True)
    assert find_folds_root(tmp_path) == target


def test_real_dataset_preferred_over_synthetic(tmp_path, synthetic):
    (tmp_path / "synthetic").symlink_to(synthetic, target_is_directory=True)
    real = tmp_path / "zz-real" / "FOLDS"
    shutil.copytree(synthetic, real, ignore=shutil.ignore_patterns(getData.SYNTHETIC_MARKER))
    assert find_folds_root(tmp_path) == real


def test_two_datasets_of_one_kind_are_refused_not_picked_by_name(tmp_path, synthetic):
    """A second unzip beside the first ("MSLD v2.0 (1)"): the alphabetically first was used without a word,
    so which data a run saw hung on folder names. One dataset reached twice (two layouts, a link) is one."""
    first = tmp_path / "MSLD v2.0" / "Original Images" / "FOLDS"
    shutil.copytree(synthetic, first, ignore=shutil.ignore_patterns(getData.SYNTHETIC_MARKER))
    (tmp_path / "link").symlink_to(tmp_path / "MSLD v2.0", target_is_directory=True)
    assert find_folds_root(tmp_path) == first and find_folds_root(tmp_path / "MSLD v2.0") == first
    second = tmp_path / "MSLD v2.0 (1)" / "FOLDS"
    shutil.copytree(first, second)
    both = f"{tmp_path}: holds 2 datasets ({first}, {second}); give --data-root"
    with pytest.raises(DataError, match=re.escape(both)):
        find_folds_root(tmp_path)
    assert_one_line_error(run_cli("train.py", "--data-root", tmp_path, "--epochs", "1"), "holds 2 datasets")


def test_a_fold_all_run_is_no_dataset(tmp_path, synthetic, trained_all):
    """A --fold all run holds fold1..5 too: given as --data-root it was read as a dataset ("no class
    folders under fold1..5/"), and beside a dataset, alphabetically first, taken for it."""
    for root in (trained_all, trained_all.parent):
        with pytest.raises(DataError, match=f"{trained_all}: a --fold all run of train.py .its checkpoints"):
            find_folds_root(root)
    (tmp_path / "a-run").symlink_to(trained_all, target_is_directory=True)
    real = tmp_path / "zz" / "FOLDS"
    shutil.copytree(synthetic, real, ignore=shutil.ignore_patterns(getData.SYNTHETIC_MARKER))
    assert find_folds_root(tmp_path) == real


def test_missing_fold_and_unknown_layout_are_clear_errors(tmp_path, synthetic):
    with pytest.raises(DataError, match="no MSLD v2.0 layout"):
        find_folds_root(tmp_path)
    shutil.copytree(synthetic, tmp_path / "FOLDS")
    shutil.rmtree(tmp_path / "FOLDS" / "fold5")
    with pytest.raises(DataError, match="missing fold5"):
        find_folds_root(tmp_path)
    (tmp_path / "photo.jpg").write_bytes(b"not a folder")
    with pytest.raises(DataError, match="photo.jpg: a file, not a folder"):
        find_folds_root(tmp_path / "photo.jpg")
    for inside in (synthetic / "fold2", synthetic / "fold2" / "Train" / "Healthy"):  # the root is above
        with pytest.raises(DataError, match=re.escape(f"inside the dataset; give --data-root {synthetic.resolve()} ")):
            find_folds_root(inside)


def test_cli_errors_are_one_line(tmp_path, synthetic):
    assert_one_line_error(run_cli("getData.py", "--data-root", tmp_path / "nope"), "no such folder")
    bad = tmp_path / "FOLDS"
    shutil.copytree(synthetic, bad)
    for p in (bad / "fold3" / "Valid" / "Measles").iterdir():
        p.unlink()
    proc = run_cli("getData.py", "--data-root", tmp_path)
    assert_one_line_error(proc, "not usable", "Measles")
    assert "audit:" in proc.stdout  # the table and audit still print


def test_a_name_with_a_newline_in_it_is_still_one_line(tmp_path):
    assert_one_line_error(run_cli("getData.py", "--data-root", tmp_path / "two\nlines"), "two\\nlines")
    assert_one_line_error(run_cli("getData.py", "--seed", "1\n2"), "'1\\n2'")


def test_unknown_flag_is_an_error():
    proc = run_cli("getData.py", "--no-such-flag")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


# ----------------------------------------------------------------------------- synthetic set
def test_synthetic_layout_counts_and_split(synthetic):
    assert list_classes(synthetic) == CLASSES
    names = {p.name for c in CLASSES for p in (synthetic / "fold1" / "Train" / c).iterdir()}
    per_fold = []
    for k in FOLDS:
        splits = {s: {p.name for p, _ in index_split(synthetic, k, s)} for s in SPLITS}
        assert all(splits.values()), f"fold{k} has an empty split"
        assert not (splits["Train"] & splits["Test"]) and not (splits["Valid"] & splits["Test"])
        per_fold.append(splits)
        names |= set().union(*splits.values())
    assert all(len(set().union(*f.values())) == len(names) for f in per_fold)  # every fold holds every image
    tests = [f["Test"] for f in per_fold]
    assert sum(map(len, tests)) == len(names) == len(set().union(*tests))  # each image tested exactly once
    for k in FOLDS:  # every class is present in every split
        for s in SPLITS:
            assert {y for _, y in index_split(synthetic, k, s)} == set(range(len(CLASSES)))


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a, b, c = (make_synthetic(tmp_path / n, seed=s) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if (c / f).exists())


def test_synthetic_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not an empty folder"):
        make_synthetic(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_the_synthetic_set_written_again_is_left_as_it_is_or_refused_for_another_seed(synthetic, tmp_path, capsys):
    """The setup command run twice was refused as "inside the dataset ..., choose a folder outside it"."""
    before = {p: p.stat().st_mtime_ns for p in synthetic.rglob("*")}
    assert getData.main(["--synthetic", str(synthetic)]) == 0
    assert capsys.readouterr().out == f"{synthetic}/ holds the synthetic demo set (--seed 0) already: nothing to " \
                                      "write\n"
    assert run_cli("getData.py", "--synthetic", synthetic, "--seed", 0).returncode == 0  # --seed 0 spelled out
    assert_one_line_error(run_cli("getData.py", "--synthetic", synthetic, "--seed", 3),
                          f"{synthetic}: holds the synthetic set of --seed 0; delete it to write --seed 3")
    assert {p: p.stat().st_mtime_ns for p in synthetic.rglob("*")} == before
    part = shutil.copytree(synthetic, tmp_path / "part")
    shutil.rmtree(part / "fold3")  # a fold deleted by hand is not the set: said so, not left as it is
    assert_one_line_error(run_cli("getData.py", "--synthetic", part), f"{part}: holds part of a synthetic set")


def test_the_main_job_on_a_fresh_clone_says_what_to_delete_when_the_synthetic_folder_is_not_the_set(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "synthetic" / "fold1").mkdir(parents=True)  # by hand: the writer leaves no half set
    assert_one_line_error(run_cli("train.py", "--epochs", 1), "data/synthetic: holds files but not the synthetic "
                          "set; delete it, and the same command writes the set again")


def test_synthetic_goes_where_the_command_line_points(monkeypatch):
    written = []
    monkeypatch.setattr(getData, "make_synthetic", lambda path, seed: written.append(path))
    for argv in (["--synthetic"], ["--synthetic", "--data-root", "/x"], ["--data-root", "/x", "--synthetic", "/y"]):
        getData.run(getData.parse_args(argv))
    assert written == ["data/synthetic", "/x", "/y"]  # --data-root X: in X, not data/synthetic unsaid


# ----------------------------------------------------------------------------- audit
def _copy(synthetic, tmp_path):
    root = tmp_path / "FOLDS"
    shutil.copytree(synthetic, root)
    return root


def _first(root, fold, split, cls):
    return sorted((root / f"fold{fold}" / split / cls).iterdir())[0]


def _variant(src, dst):
    """A new photo of the same lesion: different bytes, so only name-based checks can link it to src."""
    Image.open(src).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dst)


def _corrupt(root):
    _first(root, 1, "Train", "Cowpox").write_bytes(b"")  # zero bytes
    p = _first(root, 2, "Valid", "HFMD")
    p.write_bytes(p.read_bytes()[:300])  # truncated JPEG
    (root / "fold3" / "Test" / "Measles" / "MSL_99_01.jpg").write_text("not an image")
    return ["fold1/Train/Cowpox", "fold2/Valid/HFMD", "MSL_99_01.jpg"]


def _duplicate(root):
    src = _first(root, 1, "Test", "Healthy")
    shutil.copy(src, root / "fold1" / "Train" / "Healthy" / "HEALTHY_98_01.jpg")
    return ["HEALTHY_98_01.jpg", "in two splits"]


def _near_duplicate(root):
    """A Test photo resized and re-compressed, filed in Train under another patient's number."""
    src = _first(root, 1, "Test", "Monkeypox")
    im = Image.open(src)
    im.resize((im.width * 4 // 5, im.height * 4 // 5)).save(root / "fold1" / "Train" / "Monkeypox" / "MKP_97_01.jpg",
                                                            quality=60)
    return [src.name, "MKP_97_01.jpg", "fold1 Train/Test", "patients"]


def _patients(root):
    """Another photo of a Test patient in Train (fold 1), and of a Valid patient in Test (fold 2)."""
    test_patient = patient_id(_first(root, 1, "Test", "Monkeypox"))
    _variant(_first(root, 1, "Train", "Monkeypox"), root / "fold1" / "Train" / "Monkeypox" / f"{test_patient}_09.jpg")
    valid_patient = patient_id(_first(root, 2, "Valid", "Cowpox"))
    _variant(_first(root, 2, "Test", "Cowpox"), root / "fold2" / "Test" / "Cowpox" / f"{valid_patient}_09.jpg")
    return [test_patient, "Train and Test", valid_patient, "Valid and Test"]


def _test_overlap(root):
    src = _first(root, 1, "Test", "Chickenpox")
    for split in ("Train", "Valid"):
        (root / "fold2" / split / "Chickenpox" / src.name).unlink(missing_ok=True)
    shutil.copy(src, root / "fold2" / "Test" / "Chickenpox" / src.name)
    return ["fold1 and fold2"]


def _prefix(root):
    src = _first(root, 4, "Train", "Chickenpox")
    shutil.move(src, root / "fold4" / "Train" / "Monkeypox" / src.name)
    return [src.name, "prefix CHP means Chickenpox"]


def _augmented(root):
    src = _first(root, 5, "Test", "Measles")
    _variant(src, root / "fold5" / "Train" / "Measles" / f"{src.stem}__aug02.jpg")
    return [f"{src.stem}__aug02.jpg", "copy of Test"]


# check -> (defect maker, other checks the same defect legitimately trips)
ADDS = "test sets across folds"  # an image added to one fold only is never tested
DEFECTS = {"readable images": (_corrupt, {ADDS, "file-name prefix vs class folder"}),
           "duplicate content": (_duplicate, {ADDS, "patient overlap between splits"}),
           "near-duplicate images": (_near_duplicate, {ADDS}),
           "patient overlap between splits": (_patients, {ADDS}),
           "test sets across folds": (_test_overlap, {"patient overlap between splits"}),
           "file-name prefix vs class folder": (_prefix, set()),
           "augmented copies of held-out images": (_augmented, {ADDS, "patient overlap between splits"})}


def test_audit_clean_dataset_passes_every_check(synthetic):
    report = audit(synthetic)
    assert report["usable"] and report["synthetic"]
    assert {c["check"]: c["verdict"] for c in report["checks"]} == dict.fromkeys(DEFECTS, "PASS")


@pytest.mark.parametrize("check", list(DEFECTS))
def test_each_audit_check_fires_on_its_defect(tmp_path, synthetic, check):
    root = _copy(synthetic, tmp_path)
    make_defect, also_fires = DEFECTS[check]
    fragments = make_defect(root)
    verdicts = {c["check"]: c for c in audit(root)["checks"]}
    fired = verdicts.pop(check)
    assert fired["verdict"] in ("WARN", "FAIL")
    text = "\n".join(fired["items"])
    assert all(f in text for f in fragments), text
    quiet = {name: c["verdict"] for name, c in verdicts.items() if name not in also_fires}
    assert set(quiet.values()) == {"PASS"}, quiet


def test_audit_sees_augment_output_dirs(tmp_path, synthetic):
    src = _first(synthetic, 2, "Valid", "Cowpox")
    aug = tmp_path / "aug" / "Cowpox"
    aug.mkdir(parents=True)
    shutil.copy(src, aug / f"{src.stem}__aug00.jpg")
    report = audit(synthetic, aug_dirs={2: tmp_path / "aug"})
    leak = next(c for c in report["checks"] if c["check"] == "augmented copies of held-out images")
    assert leak["verdict"] == "FAIL" and "copy of Valid" in leak["items"][0]


def test_a_leak_the_audit_fails_is_its_exit_status_and_training_refuses_it(tmp_path, synthetic):
    """A copy of one of fold 2's Valid photos put in its Train folder by hand: the audit said FAIL and
    exited 0, and train.py trained on the photo it was scored on."""
    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    src = _first(data, 2, "Valid", "Cowpox")
    shutil.copy(src, data / "fold2" / "Train" / "Cowpox" / f"{src.stem}__aug00.jpg")
    proc = run_cli("getData.py", "--data-root", data)
    assert_one_line_error(proc, "augmented copies of held-out images", f"{src.stem}__aug00.jpg in Train is a copy of "
                          f"Valid image {src.stem}")
    assert "[FAIL] augmented copies of held-out images" in proc.stdout  # the report first, as ever
    assert_one_line_error(run_cli("train.py", "--data-root", data, "--fold", 2, "--epochs", 1, "--out", tmp_path / "r"),
                          str(data / "fold2" / "Train"), "take them out of Train")
    assert not (tmp_path / "r").exists()
    assert_one_line_error(run_cli("simclr.py", "--data-root", data, "--fold", 2, "--out", tmp_path / "s"),
                          str(data / "fold2" / "Train"), "take them out of Train")  # nor pretrains on them
    assert not (tmp_path / "s").exists()
    proc = run_cli("train.py", "--data-root", data, "--fold", 3, "--epochs", 1, "--out", tmp_path / "r3")
    assert proc.returncode == 0, proc.stderr  # fold 3's Train holds no copy of its own Valid or Test photos


def test_cli_report_json(tmp_path, synthetic):
    out = tmp_path / "r" / "audit.json"
    proc = run_cli("getData.py", "--data-root", synthetic, "--report", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["classes"] == CLASSES and len(report["checks"]) == 7
    assert "0=Chickenpox" in proc.stdout and "fold5" in proc.stdout


def test_a_report_to_a_pipe_or_a_link_is_written_through_it(tmp_path, synthetic):
    """`--report /dev/null`, `/dev/stdout` or a named pipe is written through, as the shell's `>` would:
    a temporary renamed over it would replace the device node (as root, /dev/null itself) or the link."""
    target, link, fifo = tmp_path / "audit.json", tmp_path / "link.json", tmp_path / "pipe"
    link.symlink_to(target)
    os.mkfifo(fifo)
    got = {}
    reader = threading.Thread(target=lambda: got.update(text=fifo.read_text()), daemon=True)
    reader.start()
    for out in (link, fifo):
        assert run_cli("getData.py", "--data-root", synthetic, "--report", out).returncode == 0
    reader.join(timeout=30)
    assert link.is_symlink() and fifo.is_fifo()
    assert json.loads(target.read_text())["usable"] and json.loads(got["text"])["usable"]


def test_names_map_to_patient_and_origin():
    assert patient_id("x/MKP_17_01.jpg") == "MKP_17"
    assert patient_id("HFMD_03_02__aug11.jpg") == patient_id("HFMD_3_9.jpg") == "HFMD_3"
    assert origin_stem("MKP_17_01__aug03.jpg") == "MKP_17_01"
    assert patient_id("holiday.jpg") is None


# ----------------------------------------------------------------------------- decoding
def _save(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_load_image_applies_exif_orientation():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_image(_save(im, "JPEG", exif=exif))
    assert out.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "1", "LA"])
def test_load_image_converts_modes_to_rgb(mode):
    im = Image.new("RGB", (16, 16), (200, 100, 50)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    out = load_image(_save(im, fmt))
    assert out.mode == "RGB" and out.size == (16, 16)


@pytest.mark.parametrize("dtype,scale,fmt", [(np.uint16, 257, "PNG"), (np.uint16, 257, "TIFF"), (np.int32, 1, "TIFF"),
                                             (np.float32, 1 / 255, "TIFF"), (np.float32, 1, "TIFF")],
                         ids=["16-bit PNG", "16-bit TIFF", "32-bit integer 0-255", "float 0-1", "float 0-255"])
def test_grey_of_more_than_8_bits_keeps_its_brightness(dtype, scale, fmt):
    """Lesion colour is diagnostic: a dark grey photo saved with more bits stays as dark, not stretched
    so that its brightest pixel turns white."""
    grey = np.array([[40, 90], [120, 160]] * 4, np.float64).repeat(4, 1)
    out = np.asarray(load_image(_save(Image.fromarray((grey * scale).astype(dtype)), fmt)), np.float64)
    assert np.abs(out - grey[..., None]).max() <= 1


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_image(_save(im)).getpixel((0, 0)) == (255, 255, 255)


def test_load_image_rejects_bad_files(tmp_path):
    good = _save(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    for name, data, fragment in [("empty.jpg", b"", "not a readable image"),
                                 ("cut.jpg", good[: len(good) // 2], "not a readable image"),
                                 ("text.jpg", b"hello", "not a readable image")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=fragment) as e:
            load_image(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(DataError) as e:  # named once, with the system's reason alone
        load_image(tmp_path / "gone.jpg")
    assert str(e.value) == f"{tmp_path / 'gone.jpg'}: not a readable image (No such file or directory)"
    bomb = _save(Image.new("1", (9000, 9000)))  # 81 MP, a few kB on disk
    with pytest.raises(DataError, match="limit"):
        load_image(bomb, name="bomb.png")


def test_a_pipe_or_a_device_is_one_line_not_a_wait_or_an_empty_file(tmp_path):
    """A named pipe blocked in open() until a writer came, for ever; `<(curl ...)` (a pipe too) read
    empty at its second read and was called an empty file; /dev/zero was read as an image."""
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    said = []
    reader = threading.Thread(target=lambda: said.append(_error_of(load_image, fifo)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # still waiting for a writer: give it one, so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert said == [f"{fifo}: a pipe or a device, not a file; save the photo to a file and give its path"]
    assert _error_of(load_image, "/dev/zero").startswith("/dev/zero: a pipe or a device")


def _error_of(fn, *args) -> str:
    try:
        fn(*args)
    except DataError as e:
        return str(e)
    return "no error"


def test_an_iphone_photo_says_what_it_is_and_what_to_send(tmp_path):
    """HEIC (an iPhone's default) and AVIF are not among the formats read: the line names them and
    says what to send, for a file and for uploaded bytes alike; other unknown bytes stay generic."""
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # an HEIC file's first box
    try:
        avif = _save(Image.new("RGB", (16, 16)), "AVIF")
    except (KeyError, OSError):  # a Pillow without an AVIF encoder
        avif = heic.replace(b"heic", b"avif")
    (tmp_path / "IMG_0001.HEIC").write_bytes(heic)
    for source, name in ((tmp_path / "IMG_0001.HEIC", None), (heic, "upload"), (avif, "p.avif")):
        with pytest.raises(DataError, match="not a readable image \\(a HEIC, HEIF or AVIF image.*send it as JPEG"):
            load_image(source, name=name)
    with pytest.raises(DataError, match="not a JPEG, PNG"):
        load_image(heic.replace(b"ftyp", b"free"), name="other")
    (tmp_path / "copy.jpg").write_bytes(b"")  # a copy that failed: it was called not a JPEG
    for source in (tmp_path / "copy.jpg", b""):
        with pytest.raises(DataError, match=r"not a readable image \(an empty file, 0 bytes; was it copied"):
            load_image(source)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, reading a TIFF cut inside its tags
def test_a_photo_cut_short_says_so_whatever_its_format(fmt):
    """A download cut short was "not a JPEG, PNG, ... file" when it broke the header, or Pillow's bare
    "Truncated File Read": the line names the format its first bytes show and asks whether it is whole."""
    whole = _save(Image.effect_noise((64, 64), 50).convert("RGB"), fmt)
    name = "WebP" if fmt == "WEBP" else fmt
    for cut in (14, len(whole) // 2):  # inside the header, inside the pixels
        with pytest.raises(DataError, match=rf"^p: not a readable image \(a {name} file (whose header Pillow cannot "
                                            r"read|that Pillow cannot decode: .+); was it copied or downloaded whole"):
            load_image(whole[:cut], name="p")
    for other in (b"GIF90a, a typo", b"RIFF\x00\x00\x00\x00WAVEfmt "):  # nearly a GIF's and a WebP's first bytes
        with pytest.raises(DataError, match=r"\(not a JPEG, PNG, WebP, BMP, TIFF or GIF file\)$"):
            load_image(other, name="p")


def test_a_command_given_a_photo_cut_short_says_one_line_not_pillows_warning_first(trained, tmp_path):
    """A TIFF cut inside its tags: Pillow warned "Truncated File Read" (and its source line) ahead of the
    one line that names the file. Every script's main() leaves Pillow's warnings about a file unsaid."""
    cut = tmp_path / "cut.tif"
    cut.write_bytes(_save(Image.effect_noise((64, 64), 50).convert("RGB"), "TIFF")[:100])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        proc = run_cli("gradcam.py", "--checkpoint", trained, cut, "--out", tmp_path / "g")
        kept = [f for f in warnings.filters if "PIL" in str(getattr(f[3], "pattern", f[3]))]
    assert_one_line_error(proc, f"{cut}: not a readable image (a TIFF file whose header Pillow cannot read")
    assert not [w for w in said if "PIL" in w.filename], [str(w.message) for w in said]
    assert not kept, kept  # the filter ends with the command: a notebook's own decoding still hears Pillow


def test_the_processes_a_command_spawns_leave_pillows_warning_unsaid_too(synthetic, tmp_path, capfd):
    """The writer's workers and the folds' processes are spawned: they start with Python's filters, not
    the command's, and Pillow's "Truncated File Read" came ahead of the one line naming the file."""
    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    cut = data / "fold1" / "Train" / "Monkeypox" / "zz_cut.tif"
    cut.write_bytes(_save(Image.effect_noise((64, 64), 50).convert("RGB"), "TIFF")[:100])
    for script, args in (("augment.py", ["--out", tmp_path / "aug", "--factor", 1, "--workers", 2]),
                         ("train.py", ["--out", tmp_path / "run", "--fold", "all", "--jobs", 2, "--epochs", 1,
                                       "--device", "cpu"])):
        proc = run_cli(script, "--data-root", data, *args)
        assert_one_line_error(proc, f"{cut}: not a readable image (a TIFF file whose header Pillow cannot read")
        assert "Warning" not in capfd.readouterr().err  # what the spawned processes wrote to this process's stderr


@pytest.mark.parametrize("fmt", ["JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_load_image_reads_the_formats_photos_come_in(fmt):
    im = load_image(_save(Image.new("RGB", (40, 30), (200, 100, 50)), fmt), name=f"p.{fmt.lower()}")
    assert im.size == (40, 30) and im.mode == "RGB"


def test_a_folder_of_photos_yields_every_format_load_image_reads(tmp_path):
    """gradcam.py, testing.py --ood-dir and simclr.py --extra list a folder's photos by name: every
    format load_image reads is listed (a GIF was skipped without a word), hidden files and notes are not."""
    names = ["a.jpg", "b.JPEG", "c.png", "d.webp", "e.bmp", "f.tif", "g.tiff", "h.gif"]
    for name in names:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "._a.jpg").write_bytes(b"macOS metadata")
    assert [p.name for p in images_under(tmp_path)] == names
    assert all(load_image(p).size == (8, 8) for p in images_under(tmp_path))


def test_what_else_a_folder_holds_is_said_in_one_short_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    for i, suffix in enumerate([".a", ".b", ".c", ".d", ".e", ".f", ".g"]):
        for j in range(8 - i):  # .a most common, .g least
            (tmp_path / f"{j}{suffix}").write_text("")
    images, others = getData.files_under(tmp_path)
    assert images == [tmp_path / "photo.jpg"]
    assert others == "8 .a, 7 .b, 6 .c, 5 .d, 4 .e, 5 of 2 other kinds"


def test_load_image_hands_no_other_format_to_a_decoder(monkeypatch):
    """An upload named nothing reaches only the photo decoders: an EPS would otherwise be handed to
    Ghostscript (a program, run on a stranger's file), an ICO or a PDF-like file to their plugins."""
    from PIL import EpsImagePlugin
    reached = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: reached.append("eps"))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data in (eps, _save(Image.new("RGB", (16, 16)), "ICO")):
        with pytest.raises(DataError, match="not a JPEG, PNG, WebP, BMP, TIFF or GIF file"):
            load_image(data, name="upload")
    assert reached == []


def test_dataset_cache_matches_uncached_and_returns_paths(synthetic):
    plain = MSLDDataset(synthetic, 1, "Valid", return_path=True)
    cached = MSLDDataset(synthetic, 1, "Valid", cache_size=40)
    assert len(plain) == len(cached) and torch.equal(plain.targets, cached.targets)
    assert cached.images.shape == (len(cached), 3, 40, 40) and cached.images.dtype == torch.uint8
    img, label, path = plain[3]
    x, y = cached[3]
    assert isinstance(img, Image.Image) and label == y and Path(path).parent.name == CLASSES[y]
    assert torch.equal(x, getData.prepare(img, 40))


def test_the_cache_keeps_a_photos_centre_square_not_its_whole_squashed():
    """Short side to the size, then the centre square, in landscape and portrait: a lesion keeps its
    shape (squashing a 2:1 photo makes a round lesion an oval) and the edges of the frame are left out."""
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, :40], wide[:, 40:160], wide[:, 160:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)  # 40 | 120 | 40 px
    for im in (Image.fromarray(wide), Image.fromarray(wide.transpose(1, 0, 2).copy())):
        x = getData.prepare(im, 50)
        assert x.shape == (3, 50, 50) and (x[1] == 255).all() and (x[[0, 2]] == 0).all()  # the middle 100 px only


def test_users_photos_are_decoded_small_and_the_datasets_whole(tmp_path, monkeypatch):
    """testing.py --ood-dir and simclr.py --extra decoded a phone's 12-megapixel photos whole (48 MB and
    more a thread) to keep 128 x 128 of them; the dataset's photos stay decoded whole, as README's figures."""
    half = np.zeros((3000, 4000, 3), np.uint8)
    half[:, :2000] = (200, 120, 90)  # left half skin-coloured: the picture must survive the shrinking
    Image.fromarray(half).save(tmp_path / "phone.jpg", quality=90)
    Image.fromarray(half[:2000, :3000]).save(tmp_path / "scan.png")  # no DCT scaling: reduced after decoding
    decoded, prepare = [], getData.prepare
    monkeypatch.setattr(getData, "prepare", lambda im, size: (decoded.append(im.size), prepare(im, size))[1])
    paths = [tmp_path / "phone.jpg", tmp_path / "scan.png"]
    small = getData.decode_all(paths, 40, shrink=True)
    assert all(40 <= min(wh) < 80 for wh in decoded), decoded
    decoded.clear()
    whole = getData.decode_all(paths, 40)
    assert sorted(decoded) == [(3000, 2000), (4000, 3000)]  # (threads finish in any order)
    assert (small.float() - whole.float()).abs().mean() < 2  # the same picture, grey levels 0..255


def test_decoding_many_photos_draws_a_bar_on_a_terminal_only(synthetic, capsys, monkeypatch):
    """A folder of photos is decoded with a bar, which a log (stderr not a terminal) never gets: it had
    one per decode of 200 photos or more, into every `nohup ... &` log of a real run."""
    paths = sorted(synthetic.glob("fold*/*/*/*.jpg"))[:200]
    getData.decode_all(paths, 8)
    getData.check_images(paths)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    getData.decode_all(paths, 8)
    assert "decode:   0%|          | 0/200" in capsys.readouterr().err


def test_dataset_bad_fold_and_split(synthetic):
    with pytest.raises(DataError, match="fold 7"):
        MSLDDataset(synthetic, 7, "Train")
    with pytest.raises(DataError, match="split"):
        MSLDDataset(synthetic, 1, "Training")


# ----------------------------------------------------------------------------- download
def _zip_bytes(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


class _Server:
    """A local HTTP server for one payload; `cut_first` drops the first response half-way."""

    def __init__(self, payload: bytes, cut_first=False, need_auth=None, length=None, range_from=None):
        """`length`: the Content-Length header to send instead of the payload's (a lie, or no number);
        `range_from`: answer a Range request with the bytes from there on instead (a server's bug)."""
        self.payload, self.cut_first, self.need_auth, self.requests = payload, cut_first, need_auth, []
        self.length, self.range_from = length, range_from
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append((self.path, dict(self.headers)))
                if outer.need_auth and self.headers.get("Authorization") != outer.need_auth:
                    self.send_error(401)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if "Range" in self.headers else None
                if start is not None and outer.range_from is not None:
                    start = outer.range_from
                body = outer.payload[start or 0:]
                self.send_response(200 if start is None else 206)
                if start is not None:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.payload) - 1}/{len(outer.payload)}")
                self.send_header("Content-Length", outer.length or str(len(body)))
                self.end_headers()
                if outer.cut_first and len(outer.requests) == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self._serving = serving(self.httpd)
        self._serving.__enter__()
        return self

    def __exit__(self, *exc):
        return self._serving.__exit__(*exc)


def test_download_and_extract(tmp_path):
    payload = _zip_bytes({"FOLDS/fold1/Train/Cowpox/CWP_01_01.jpg": b"x" * 1000})
    with _Server(payload) as srv:
        target = getData.download(f"{srv.url}/msld.zip", tmp_path)
    assert target == tmp_path / "msld"
    assert (target / "FOLDS/fold1/Train/Cowpox/CWP_01_01.jpg").read_bytes() == b"x" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["msld"]  # no part file, no temp folder left
    with _Server(payload) as srv, pytest.raises(DataError, match="msld: already exists .downloaded before.."):
        getData.download(f"{srv.url}/msld.zip", tmp_path)  # again: refused before the download, not after it
    assert srv.requests == []


def test_a_download_larger_than_the_disk_is_refused_before_a_byte_is_written(tmp_path):
    with _Server(b"PK" * 100, length=str(10**15)) as srv:  # a petabyte declared
        with pytest.raises(DataError, match=r"big\.zip: downloading it takes 1000000\.0 GB and .* GB free; free"):
            getData.download(f"{srv.url}/big.zip", tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


def test_a_download_whose_length_is_no_number_is_read_to_the_end(tmp_path):
    payload = _zip_bytes({"FOLDS/fold1/Train/Cowpox/CWP_01_01.jpg": b"x" * 1000})
    with _Server(payload, length="many") as srv:
        root = getData.download(f"{srv.url}/msld.zip", tmp_path / "d")
    assert (root / "FOLDS/fold1/Train/Cowpox/CWP_01_01.jpg").read_bytes() == b"x" * 1000


def test_a_disk_that_fills_during_a_download_is_one_line_at_once(small_disk):
    with _Server(b"x" * 600_000, length="unsaid") as srv:  # more than the 400 KB disk, and not said beforehand
        proc = run_cli("getData.py", "--download", f"{srv.url}/msld.zip", "--data-root", small_disk)
    assert_one_line_error(proc, ".msld.zip.part: could not be written (disk full); free some space and run the same")
    assert len(srv.requests) == 1  # not tried again: that makes no room


def test_a_web_page_instead_of_the_zip_and_a_malformed_url_are_one_line(tmp_path):
    """A sign-in page came instead of the zip: 'delete .x.zip.part and download again', which fetched
    the same page; and a URL urllib cannot parse was a ValueError traceback."""
    with _Server(b"<!DOCTYPE html><html><body>Sign in</body></html>") as srv:
        proc = run_cli("getData.py", "--download", f"{srv.url}/msld.zip", "--data-root", tmp_path / "d")
    assert_one_line_error(proc, "msld.zip: what came is not a zip file (it starts b'<!DOCTYPE html>", "a web page")
    assert list((tmp_path / "d").iterdir()) == []  # nothing to resume: the page is not kept
    for url in ("http://[bad/x.zip", "http://127.0.0.1:1/a b.zip"):
        assert_one_line_error(run_cli("getData.py", "--download", url, "--data-root", tmp_path / "e"),
                              f"{url}: not a URL that can be fetched")


def test_interrupted_download_resumes_with_range(tmp_path):
    payload = _zip_bytes({f"d/f{i}.bin": bytes(np.random.default_rng(i).integers(0, 255, 5000, np.uint8))
                          for i in range(20)})
    with _Server(payload, cut_first=True) as srv:
        target = getData.download(f"{srv.url}/big.zip", tmp_path)
    assert len(srv.requests) == 2 and "Range" in srv.requests[1][1]
    assert sorted(p.name for p in (target / "d").iterdir()) == sorted(f"f{i}.bin" for i in range(20))


def test_a_resumed_download_that_gets_another_range_starts_again(tmp_path):
    """A server that answers `Range: bytes=N-` with a 206 of other bytes (here from 0): appended to the
    part file they made a corrupt zip, deleted as "not a zip" after the whole download."""
    payload = _zip_bytes({f"d/f{i}.bin": bytes(np.random.default_rng(i).integers(0, 255, 5000, np.uint8))
                          for i in range(20)})
    with _Server(payload, cut_first=True, range_from=0) as srv:
        target = getData.download(f"{srv.url}/big.zip", tmp_path)
    assert len(srv.requests) == 3 and "Range" in srv.requests[1][1] and "Range" not in srv.requests[2][1]
    assert sorted(p.name for p in (target / "d").iterdir()) == sorted(f"f{i}.bin" for i in range(20))


def test_a_url_whose_file_name_is_no_folder_name_downloads_as_dataset(tmp_path):
    payload = _zip_bytes({"FOLDS/readme.txt": b"x"})
    with _Server(payload) as srv:
        for i, name in enumerate(("..", "%2e%2e", "a%00b.zip", "")):
            assert getData.download(f"{srv.url}/{name}", tmp_path / str(i)) == tmp_path / str(i) / "dataset"


def test_ctrl_c_during_a_download_says_the_same_command_continues_it(tmp_path, monkeypatch):
    payload = _zip_bytes({"FOLDS/readme.txt": b"x" * 5000})
    with _Server(payload) as srv:
        with monkeypatch.context() as m:
            m.setattr(getData.tqdm, "update", lambda self, n: (_ for _ in ()).throw(KeyboardInterrupt))
            cut = run_cli("getData.py", "--download", f"{srv.url}/big.zip", "--data-root", tmp_path)
        part = tmp_path / ".big.zip.part"
        assert cut.returncode == 130 and part.is_file()
        assert cut.stderr.strip().splitlines()[-1] == \
            f"interrupted: the same command continues the download from {part}"
        done = run_cli("getData.py", "--download", f"{srv.url}/big.zip", "--data-root", tmp_path)
    assert done.returncode == 0 and (tmp_path / "big" / "FOLDS" / "readme.txt").read_bytes() == b"x" * 5000
    assert "Range" in srv.requests[1][1]  # continued, not started again


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed KeyboardInterrupt
@pytest.mark.parametrize("sig, line, status", [(signal.SIGINT, "interrupted", 130),
                                              (signal.SIGTERM, "terminated", 143)])
def test_a_stop_that_a_finalizer_swallowed_is_still_the_stop(capsys, sig, line, status):
    """Python runs a signal's handler wherever the main thread is, a `__del__` included (tqdm's, seen),
    which drops what it raises: under torchrun one rank then went on into a collective with the other
    ranks gone, and printed gloo's "Connection closed by peer" traceback instead of its one line."""
    def body():
        with getData.on_interrupt("the same command continues it"):
            signal_in_a_finalizer(sig)
            raise RuntimeError("[gloo/transport/tcp/pair.cc:547] Connection closed by peer")

    with ctrl_c_as_from_a_terminal():
        handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
        with pytest.MonkeyPatch.context() as m:
            m.delenv("TORCHELASTIC_RUN_ID", raising=False)
            assert getData.run_main(body) == status
        assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # given back
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{line}: the same command continues it"


def test_zip_slip_is_refused_and_nothing_is_left(tmp_path):
    payload = _zip_bytes({"ok.txt": b"fine", "../../escaped.txt": b"evil"})
    with _Server(payload) as srv, pytest.raises(DataError, match="escape"):
        getData.download(f"{srv.url}/evil.zip", tmp_path / "data")
    assert not (tmp_path / "escaped.txt").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == [".evil.zip.part"]  # no half-extracted folder


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # the Unix mode of a symbolic link, as `zip --symlinks` stores it
    return info


@pytest.mark.parametrize("member", ["../../escaped.txt", "/tmp/escaped.txt", "link"])
def test_an_archive_member_outside_the_target_or_a_link_is_refused_before_a_byte_is_written(tmp_path, member):
    """A link is refused whatever it points to: unzip and most extractors create it, and the next member
    written through it lands where it points."""
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok.txt", b"fine")
        if member == "link":
            z.writestr(_symlink(member), "/etc")
        else:
            z.writestr(member, b"evil")
    with pytest.raises(DataError, match=f"member '{member}' would escape the target folder"):
        getData.safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def test_kaggle_download_sends_credentials(tmp_path, monkeypatch):
    payload = _zip_bytes({"Original Images/FOLDS/readme.txt": b"hi"})
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    expected = "Basic " + __import__("base64").b64encode(b"alice:s3cret").decode()
    with _Server(payload, need_auth=expected) as srv:
        monkeypatch.setattr(getData, "KAGGLE_API", srv.url)
        target = getData.download("kaggle", tmp_path)
    assert srv.requests[0][0] == f"/datasets/download/{getData.KAGGLE_DATASET}"
    assert (target / "Original Images/FOLDS/readme.txt").read_text() == "hi"


def test_kaggle_without_credentials_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(DataError, match="Kaggle credentials"):
        getData.download("kaggle", tmp_path)


# ----------------------------------------------------------------------------- real data
def test_real_layout_counts_and_known_defects(real_root):
    assert list_classes(real_root) == CLASSES
    for k in FOLDS:
        assert sum(len(index_split(real_root, k, s)) for s in SPLITS) == 755
    report = audit(real_root)
    assert report["usable"] and not report["synthetic"]
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["readable images"]["verdict"] == "PASS"
    # MSLD v2.0 ships one Chickenpox photo under two names, which lands in two splits of some folds.
    assert any("CHP_26_01.jpg" in it and "CHP_62_01.jpg" in it for it in checks["duplicate content"]["items"])
    assert checks["test sets across folds"]["verdict"] == "WARN"


def test_real_cli_prints_table_and_audit(real_root):
    proc = run_cli("getData.py", "--data-root", Path(__file__).resolve().parents[2] / "shared" / "data")
    assert proc.returncode == 0, proc.stderr
    assert "Monkeypox          202/55/27" in proc.stdout and "[WARN] duplicate content" in proc.stdout


def test_a_near_duplicate_of_one_patient_in_two_splits_is_a_leak_too(tmp_path, synthetic):
    """A Valid photo resized and re-compressed, filed in Test as a new photo of the same patient: one
    patient, but the network is tested on a copy of what selected it."""
    root = _copy(synthetic, tmp_path)
    src = _first(root, 2, "Valid", "Cowpox")
    im = Image.open(src)
    im.resize((im.width * 4 // 5, im.height * 4 // 5)).save(root / "fold2" / "Test" / "Cowpox" /
                                                            f"{patient_id(src)}_09.jpg", quality=60)
    near = next(c for c in audit(root)["checks"] if c["check"] == "near-duplicate images")
    pair, = near["pairs"]
    assert near["verdict"] != "PASS" and pair["patients"] == [patient_id(src)], near
    assert pair["split_across"] == ["fold2 Valid/Test"], pair


def test_near_duplicate_pairs_are_in_the_json_report(tmp_path, synthetic):
    root = _copy(synthetic, tmp_path)
    _near_duplicate(root)
    near = next(c for c in audit(root)["checks"] if c["check"] == "near-duplicate images")
    pair, = near["pairs"]
    planted_from = f"Monkeypox/{_first(root, 1, 'Test', 'Monkeypox').name}"
    assert {pair["a"], pair["b"]} == {planted_from, "Monkeypox/MKP_97_01.jpg"}
    assert 0 <= pair["distance"] <= getData.NEAR_DUPLICATE_BITS and pair["split_across"] == ["fold1 Train/Test"]


def test_a_zip_downloaded_by_hand_is_named_and_extracted(synthetic, tmp_path):
    """Users pass the Kaggle zip itself as --data-root, or leave it unextracted in data/: one line says
    how to extract it, and `getData.py --extract` does, safely, into a folder the scripts then find."""
    archive = tmp_path / "downloads" / "archive.zip"
    archive.parent.mkdir()
    archive.write_bytes(_zip_bytes({f"Original Images/Original Images/FOLDS/{p.relative_to(synthetic)}": p.read_bytes()
                                    for p in synthetic.rglob("*") if p.is_file()}))
    hint = f"getData.py --extract '{archive}'"
    assert_one_line_error(run_cli("train.py", "--data-root", archive, "--out", tmp_path / "r"), "a zip archive", hint)
    assert_one_line_error(run_cli("getData.py", "--data-root", archive.parent), "no MSLD v2.0 layout", hint)
    done = run_cli("getData.py", "--extract", archive, "--data-root", tmp_path / "data")
    assert done.returncode == 0, done.stderr
    folds = tmp_path / "data" / "archive" / "Original Images" / "Original Images" / "FOLDS"
    assert done.stdout.strip() == f"extracted to {tmp_path / 'data' / 'archive'}; its folds are in {folds}"
    assert find_folds_root(tmp_path / "data") == folds and list_classes(folds) == CLASSES
    assert_one_line_error(run_cli("getData.py", "--extract", archive, "--data-root", tmp_path / "data"),
                          "already exists")


def test_an_archive_that_is_not_msld_or_does_not_fit_is_refused_before_a_byte_is_written(synthetic, tmp_path,
                                                                                         monkeypatch):
    other = tmp_path / "photos.zip"  # a zip of something else: 300 MB of zeros, say
    other.write_bytes(_zip_bytes({"holiday/IMG_0001.jpg": b"x", "fold1/notes.txt": b"y"}))
    assert_one_line_error(run_cli("getData.py", "--extract", other, "--data-root", tmp_path / "data"),
                          "not MSLD v2.0", "fold2, fold3, fold4, fold5")
    notes = tmp_path / "notes.md"  # not a zip at all: the user's file is theirs to keep
    notes.write_text("# my notes")
    error = run_cli("getData.py", "--extract", notes, "--data-root", tmp_path / "data")
    assert_one_line_error(error, f"{notes}: not a zip file; give --extract the MSLD v2.0 .zip")
    assert "delete" not in error.stderr and notes.read_text() == "# my notes"
    archive = tmp_path / "msld.zip"
    archive.write_bytes(_zip_bytes({f"FOLDS/{p.relative_to(synthetic)}": p.read_bytes()
                                    for p in synthetic.rglob("*.jpg")}))
    monkeypatch.setattr(getData.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    assert_one_line_error(run_cli("getData.py", "--extract", archive, "--data-root", tmp_path / "data"),
                          "msld.zip: extracting it takes", "free some space")
    assert not (tmp_path / "data").exists()


def test_two_main_jobs_started_at_once_on_a_fresh_clone_share_the_synthetic_set(tmp_path, monkeypatch):
    """Two terminals, `python train.py --fold 1` and `--fold 2`, on a fresh clone: both found no data and
    wrote the synthetic set; the second to finish stopped with 'could not be written'."""
    real, calls = getData.make_synthetic, []

    def raced(path, seed=0):
        calls.append(path)
        real(path, seed)  # the other command, a moment earlier
        return real(path, seed)  # this one, which finds the folder written
    monkeypatch.setattr(getData, "make_synthetic", raced)
    monkeypatch.chdir(tmp_path)
    assert getData.resolve_data_root("data") == tmp_path / "data" / "synthetic" and len(calls) == 1
    assert list_classes(tmp_path / "data" / "synthetic") == CLASSES
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["synthetic"]  # nothing half-written beside it
