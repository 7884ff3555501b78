"""What users and strangers send the command lines: every mistake is one line, and nothing is lost.

Bad numbers for every script (checked in one place, getData.Number), data roots the audit calls
unusable, empty checkpoints, runs resumed from elsewhere or into another's folder, full disks,
diverging runs.
"""
import contextlib
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

import augment
import getData
import gradcam
import serve
import simclr
import testing
import train
from conftest import assert_one_line_error, killed_on_call, run_cli, train_args
from getData import Number, Parser, WriteError, index_split, list_classes
from models import ModelError, build_model, checkpoint_dict, claim_run_dir, resume, save_checkpoint

SCRIPTS = {"train.py": train, "simclr.py": simclr, "testing.py": testing, "gradcam.py": gradcam, "serve.py": serve,
           "augment.py": augment, "getData.py": getData}


# ----------------------------------------------------------------------------- numbers
def _parser(module, monkeypatch) -> Parser:
    seen = []
    monkeypatch.setattr(Parser, "parse_args", lambda self, argv=None: seen.append(self))
    module.parse_args([])
    return seen[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_number_of_every_script_is_checked_by_one_type(script, monkeypatch):
    """Each script parses with getData.Parser, where a number is a Number (a bare int or float becomes
    one through the parser's type registry): no flag can take nan, inf or an unchecked value."""
    parser = _parser(SCRIPTS[script], monkeypatch)
    assert isinstance(parser, Parser)
    numeric = [a for a in parser._actions if a.type is not None]
    assert numeric or script == "getData.py"
    for action in numeric:
        checker = parser._registry_get("type", action.type, action.type)
        assert isinstance(checker, Number), (script, action.dest)
        if checker.kind is float:
            with pytest.raises(Exception, match="not a finite number"):
                checker("nan")


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_text_flag_takes_an_empty_value(script, monkeypatch, capsys):
    """`--out "$OUT"` with OUT unset: an empty path meant the current folder (simclr.py --extra and
    testing.py --ood-dir searched it for images, `--aug-dir ''` named its folders as missing classes)."""
    texts = [a for a in _parser(SCRIPTS[script], monkeypatch)._actions
             if a.option_strings and a.type is None and a.nargs != 0 and a.dest != "help"]
    assert texts
    monkeypatch.undo()
    for action in texts:
        with pytest.raises(SystemExit):
            SCRIPTS[script].parse_args([action.option_strings[0], ""])
        assert capsys.readouterr().err.startswith(f"error: {action.option_strings[0]} '': an empty value"), action.dest


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_every_default_worth_saying(script, monkeypatch):
    """--help shows what a flag does when it is left out: its default, unless that is nothing (None,
    off, empty) or the help text already says it in words."""
    parser = _parser(SCRIPTS[script], monkeypatch)
    text = " ".join(parser.format_help().split()) + " "  # as one line: argparse wraps the help column
    assert "default: False" not in text and "default: None" not in text and "default: []" not in text
    shown = [a for a in parser._actions if not (a.default is None or a.default is False or a.default == []
                                                or a.default == "==SUPPRESS==" or "default" in (a.help or ""))]
    assert shown
    for action in shown:
        assert f"default: {action.default})" in text or f"default: {action.default} " in text, action.dest


BAD_VALUES = [  # (script, arguments, what the line must name)
    ("train.py", ["--lr", "nan"], "--lr nan"), ("train.py", ["--lr", "inf"], "--lr inf"),
    ("train.py", ["--lr", "1e308"], "--lr 1e308: out of range"), ("simclr.py", ["--lr", "1e39"], "--lr 1e39"),
    ("train.py", ["--weight-decay", "nan"], "--weight-decay nan"), ("train.py", ["--clip-grad", "nan"], "--clip-grad"),
    ("train.py", ["--mu", "nan"], "--mu nan"), ("train.py", ["--label-smoothing", "2"], "--label-smoothing 2"),
    ("train.py", ["--label-smoothing", "-1"], "--label-smoothing -1"), ("train.py", ["--seed", "-1"], "--seed -1"),
    ("train.py", ["--seed", str(2**63)], f"--seed {2**63}: out of range"),
    ("train.py", ["--input-size", "0"], "--input-size 0"), ("train.py", ["--input-size", "2000"], "--input-size 2000"),
    ("simclr.py", ["--proj-dim", "99999999999999999999"], "--proj-dim 99999999999999999999: out of range"),
    ("train.py", ["--warmup-epochs", "-3"], "--warmup-epochs"),
    ("train.py", ["--mixup", "nan"], "--mixup nan"), ("train.py", ["--save-every", "nan"], "--save-every nan"),
    ("train.py", ["--input-size", "64"], "--input-size 64: lenet needs 32x32"),
    ("testing.py", ["--batch-size", "0"], "--batch-size 0"), ("gradcam.py", ["--limit", "0"], "--limit 0"),
    ("testing.py", ["--bootstrap", "99999999999999999999"], "--bootstrap 99999999999999999999: out of range"),
    ("gradcam.py", ["--batch-size", "0"], "--batch-size 0"), ("simclr.py", ["--lr", "nan"], "--lr nan"),
    ("simclr.py", ["--temperature", "nan"], "--temperature nan"), ("simclr.py", ["--proj-dim", "0"], "--proj-dim 0"),
    ("simclr.py", ["--knn-k", "0"], "--knn-k 0"), ("augment.py", ["--workers", "-1"], "--workers -1"),
    ("augment.py", ["--workers", "99999999999999999999"], "--workers 99999999999999999999: out of range"),
    ("augment.py", ["--benchmark", "--batch-size", "0"], "--batch-size 0"),
]


@pytest.mark.parametrize("script,args,fragment", BAD_VALUES, ids=[" ".join([s, *a]) for s, a, _ in BAD_VALUES])
def test_bad_values_are_one_line(script, args, fragment, synthetic, trained, tmp_path):
    where = {"train.py": ["--data-root", synthetic, "--out", tmp_path / "r", "--epochs", 1, "--device", "cpu"],
             "simclr.py": ["--data-root", synthetic, "--out", tmp_path / "s", "--epochs", 1, "--device", "cpu"],
             "testing.py": ["--checkpoint", trained / "best.pt", "--out", tmp_path / "t", "--device", "cpu"],
             "gradcam.py": ["--checkpoint", trained / "best.pt", "--fold", 1, "--out", tmp_path / "g"],
             "augment.py": ["--data-root", synthetic, "--out", tmp_path / "a"]}[script]
    assert_one_line_error(run_cli(script, *where, *args), fragment)
    assert not (tmp_path / "r" / "best.pt").exists()


def test_outputs_where_a_file_stands_are_one_line_before_any_work(synthetic, trained, trained_all, tmp_path,
                                                                   monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def work(*a, **k):
        raise AssertionError("the output folder is refused only after the work")
    for module, name in ((testing, "evaluate_fold"), (gradcam, "run_gradcam"), (gradcam, "faithfulness")):
        monkeypatch.setattr(module, name, work)
    photo = next(synthetic.rglob("*.jpg"))
    assert_one_line_error(run_cli("train.py", *train_args(synthetic, blocker, "--epochs", 1)), "a-file")
    for checkpoint in (trained / "best.pt", trained_all):
        assert_one_line_error(run_cli("testing.py", "--checkpoint", checkpoint, "--out", blocker / "t"), "a-file")
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", trained / "best.pt", photo, "--out", blocker / "g"),
                          "a-file")
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", trained / "best.pt", photo, "--faithfulness",
                                  "--out", blocker / "g"), "a-file")
    assert_one_line_error(run_cli("getData.py", "--data-root", synthetic, "--report", blocker / "audit.json"),
                          "a-file")
    for out in (blocker, blocker / "aug"):
        assert_one_line_error(run_cli("augment.py", "--data-root", synthetic, "--out", out), "a-file")
        assert_one_line_error(run_cli("getData.py", "--synthetic", out), "a-file")
    assert blocker.read_text() == "not a folder"


def test_outputs_are_never_written_into_a_dataset(synthetic, trained, tmp_path, monkeypatch):
    """testing.py --out into a class folder wrote its figures there, and the next run trained and tested
    on confusion.png as a photo of that class; a run's folder inside a split became a new class. Every
    script refuses an output in a dataset (a folder holding fold1..5) before any work."""
    def work(*a, **k):
        raise AssertionError("the output folder is refused only after the work")
    for module, name in ((testing, "evaluate_fold"), (gradcam, "run_gradcam")):
        monkeypatch.setattr(module, name, work)
    before = sorted(synthetic.rglob("*"))
    mpox = synthetic / "fold1" / "Test" / "Monkeypox"
    photo = next(mpox.glob("*.jpg"))
    for script, args in (("train.py", train_args(synthetic, synthetic / "fold1" / "Train" / "runs", "--epochs", 1)),
                         ("train.py", train_args(synthetic, synthetic, "--epochs", 1, "--overwrite")),
                         ("simclr.py", ["--data-root", synthetic, "--out", mpox / "simclr", "--epochs", 1]),
                         ("testing.py", ["--checkpoint", trained, "--out", mpox]),
                         ("gradcam.py", ["--checkpoint", trained, photo, "--out", mpox]),
                         ("augment.py", ["--data-root", synthetic, "--out", synthetic / "fold2" / "aug"]),
                         ("getData.py", ["--synthetic", synthetic / "fold1" / "Train" / "Extra"])):  # a new class
        assert_one_line_error(run_cli(script, *args), "inside the dataset", "where outputs would become data")
    assert sorted(synthetic.rglob("*")) == before
    data = tmp_path / "data"  # a download's layout: the folds a level below --data-root
    data.mkdir()
    (data / "MSLD").symlink_to(synthetic)
    assert run_cli("augment.py", "--data-root", data, "--out", data / "aug" / "fold1", "--factor", 1,
                   "--ops", "hflip", "--workers", 1).returncode == 0  # README's command: beside the folds, not in


def test_an_aug_dir_that_is_not_augment_pys_output_is_one_line(synthetic, tmp_path):
    strange = tmp_path / "strange"
    (strange / "Flu").mkdir(parents=True)
    empty = tmp_path / "not-augment-output"
    (empty / "Measles").mkdir(parents=True)
    (empty / "report.md").write_text("testing.py's output, say")
    for aug, fragment in ((tmp_path / "missing", "missing: no such folder; give a folder that augment.py wrote"),
                          (strange, "found ['Flu']"), (empty, "not-augment-output: no images in <Class>/ folders"),
                          (synthetic / "fold1" / "Train", f"a folder of the dataset {synthetic}, not augment.py's")):
        assert_one_line_error(run_cli("train.py", *train_args(synthetic, tmp_path / "r", "--aug-dir", aug)), fragment)
        assert_one_line_error(run_cli("getData.py", "--data-root", synthetic, "--aug-dir", f"1={aug}"), fragment)


def test_an_aug_dir_of_held_out_photos_themselves_is_refused_as_their_copies_are(synthetic, tmp_path):
    """A copy of fold 2's Train split holds many of fold 1's Valid and Test photos, under their own
    names: only augment.py's NAME__augNN copies were traced back, so fold 1 trained on its Test photos."""
    theirs = shutil.copytree(synthetic / "fold2" / "Train", tmp_path / "fold2-train")
    assert_one_line_error(run_cli("train.py", *train_args(synthetic, tmp_path / "r", "--aug-dir", theirs)),
                          "of fold 1's Valid and Test photos or copies of them", "in Train is Test image")
    proc = run_cli("getData.py", "--data-root", synthetic, "--aug-dir", f"1={theirs}")
    assert "[FAIL] augmented copies of held-out images" in proc.stdout, proc.stdout  # the audit says it too


def test_outputs_never_go_into_a_training_runs_own_folder(synthetic, trained, trained_all, monkeypatch):
    """testing.py and gradcam.py write config.json and summary.md: into a run's folder they would replace
    the run's own (and --resume would no longer match). Refused before any work."""
    def work(*a, **k):
        raise AssertionError("the output folder is refused only after the work")
    for module, name in ((testing, "evaluate_fold"), (gradcam, "run_gradcam"), (gradcam, "faithfulness")):
        monkeypatch.setattr(module, name, work)
    before = {p: p.read_bytes() for p in (trained / "config.json", trained_all / "summary.md")}
    for checkpoint, out in ((trained / "best.pt", trained), (trained_all, trained_all),
                            (trained_all, trained_all / "fold2")):
        assert_one_line_error(run_cli("testing.py", "--checkpoint", checkpoint, "--out", out),
                              f"--out {out}: a training run's folder", str(out / "test"))
    photo = next(synthetic.rglob("*.jpg"))
    for extra in ((photo,), (photo, "--faithfulness")):
        assert_one_line_error(run_cli("gradcam.py", "--checkpoint", trained, *extra, "--out", trained),
                              "a training run's folder", str(trained / "gradcam"))
    assert all(p.read_bytes() == content for p, content in before.items())


def test_a_layer_without_a_spatial_map_is_one_line(trained, synthetic):
    photo = next(synthetic.rglob("*.jpg"))
    assert_one_line_error(run_cli("gradcam.py", "--checkpoint", trained / "best.pt", photo, "--layer", "head",
                                  "--out", trained.parent / "cam-head"), "--layer head", "not a spatial map")


def test_file_names_that_are_not_utf8_are_kept_as_they_are(synthetic, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    name = os.fsdecode(b"photo-\xff\xfe.jpg")  # bytes no encoding can show: Python keeps them as surrogates
    Image.new("RGB", (40, 30), (180, 110, 90)).save(extra / name, "JPEG")  # a photo of its own: no repeat of one
    out = tmp_path / "s"
    assert simclr.main(["--data-root", str(synthetic), "--extra", str(extra), "--epochs", "1", "--device", "cpu",
                        "--out", str(out)]) == 0
    assert b"photo-\xff\xfe.jpg" in (out / "files.txt").read_bytes()


# ----------------------------------------------------------------------------- data the audit refuses
def _broken(synthetic, tmp_path, how: str) -> Path:
    root = tmp_path / how.replace(" ", "-")
    shutil.copytree(synthetic, root)
    if how == "empty class folder":
        for p in (root / "fold2" / "Valid" / "Measles").iterdir():
            p.unlink()
    elif how == "class missing from a split":
        shutil.rmtree(root / "fold3" / "Test" / "Cowpox")
    elif how == "class name not UTF-8":  # testing.py's figures stopped with a traceback from matplotlib
        for split in root.glob("fold*/*"):
            os.rename(split / "Measles", os.fsdecode(os.fsencode(split) + b"/Mea\xffsles"))
    elif how == "class in one fold only":
        (root / "fold4" / "Train" / "Extra").mkdir()
        shutil.copy(next(synthetic.rglob("*.jpg")), root / "fold4" / "Train" / "Extra" / "EXT_1_01.jpg")
    return root


@pytest.mark.parametrize("how,names", [("empty class folder", "fold2/Valid: no images for class Measles"),
                                       ("class missing from a split", "fold3/Test: no images for class Cowpox"),
                                       ("class in one fold only", "no images for class Extra"),
                                       ("class name not UTF-8", "class folder name 'Mea\\xffsles' is not UTF-8 text")])
def test_every_script_refuses_a_data_root_the_audit_refuses(synthetic, trained, tmp_path, how, names):
    """One verdict, the audit's (getData.structure_problems): no script adds a class without images."""
    root = _broken(synthetic, tmp_path, how)
    assert_one_line_error(run_cli("getData.py", "--data-root", root), names)
    best = trained / "best.pt"
    for script, args in (("train.py", train_args(root, tmp_path / "r", "--epochs", 1)),
                         ("simclr.py", ["--data-root", root, "--epochs", 1, "--out", tmp_path / "s"]),
                         ("testing.py", ["--checkpoint", best, "--data-root", root, "--out", tmp_path / "t"]),
                         ("gradcam.py", ["--checkpoint", best, "--data-root", root, "--fold", 1,
                                         "--out", tmp_path / "g"]),
                         ("augment.py", ["--data-root", root, "--out", tmp_path / "a", "--factor", 1])):
        assert_one_line_error(run_cli(script, *args), names)
    assert not any((tmp_path / d).exists() for d in ("t", "g", "a")) and not (tmp_path / "r" / "best.pt").exists()


def test_archive_leftovers_and_hidden_folders_are_not_classes(synthetic, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic, root)
    for junk in ("__MACOSX", ".thumbnails"):
        (root / "fold1" / "Train" / junk).mkdir()
        shutil.copy(next(synthetic.rglob("*.jpg")), root / "fold1" / "Train" / junk / "._MKP_1_01.jpg")
    assert list_classes(root) == list_classes(synthetic)
    assert train.main(train_args(root, tmp_path / "r", "--epochs", 1)) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["classes"] == list_classes(synthetic)


# ----------------------------------------------------------------------------- checkpoints and runs
class _RunsCode:
    """Unpickled, it would create the file `marker`: what a stranger's checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _bad_checkpoint(kind: str, path: Path, trained: Path) -> tuple:
    """Write a bad checkpoint of a kind; return what its one line must say."""
    if kind == "empty":
        path.write_bytes(b"")
        return "0 bytes",
    if kind == "text":
        path.write_text("hello")
        return "not a PyTorch checkpoint", "b'hell'"
    if kind == "cut":
        path.write_bytes((trained / "best.pt").read_bytes()[:5000])
        return "not a PyTorch checkpoint, or damaged",
    torch.save({"model": "lenet", "state_dict": _RunsCode(path.with_suffix(".ran"))}, path)
    return "may hold code, which is never run here",


@pytest.mark.parametrize("kind", ["empty", "text", "cut", "runs code"])
def test_a_bad_checkpoint_is_one_line_in_every_loader_and_runs_nothing(synthetic, trained, tmp_path, kind):
    bad = tmp_path / "bad.pt"
    says = _bad_checkpoint(kind, bad, trained)
    photo = next(synthetic.rglob("*.jpg"))
    for script, args in (("train.py", train_args(synthetic, tmp_path / "r", "--epochs", 1, "--init", bad)),
                         ("testing.py", ["--checkpoint", bad]), ("gradcam.py", ["--checkpoint", bad, photo]),
                         ("serve.py", ["--checkpoint", bad]),
                         ("simclr.py", ["--data-root", synthetic, "--init", bad, "--out", tmp_path / "s"])):
        assert_one_line_error(run_cli(script, *args), "bad.pt", *says)
    run = tmp_path / "cut"
    run.mkdir()
    shutil.copy(bad, run / "last.pt")
    assert_one_line_error(run_cli("train.py", *train_args(synthetic, run, "--epochs", 1, "--resume")),
                          "last.pt", *says)
    assert not bad.with_suffix(".ran").exists()  # nothing in the file was run


def _edit(ckpt: dict, key: str, value):
    """ckpt with `key` (a path "ood/thresholds/knn" into nested dicts) set to value."""
    ckpt = copy.deepcopy(ckpt)
    *parents, last = key.split("/")
    inner = ckpt
    for k in parents:
        inner = inner[k]
    inner[last] = value(inner[last]) if callable(value) else value
    return ckpt


EDITED = [  # a best.pt that says wrong things of itself (edited by hand, or a stranger's): (key, value, the line)
    ("classes", ["Only"], "its classes ['Only'] are not two or more distinct names"),
    ("classes", ["A", "A", "B", "C", "D", "E"], "are not two or more distinct names"),
    ("classes", [1, 2, 3, 4, 5, 6], "are not two or more distinct names"),
    ("classes", [f"c{i}" for i in range(7)], "size mismatch for head.weight"),  # was served with a random head
    ("input_size", 50_000, "its input size 50000 is not a whole number from 1 to 1024"),
    ("input_size", "32", "its input size '32' is not"), ("fold", "abc", "its fold 'abc' is not one of 1..5"),
    ("fold", torch.ones(2), "its fold tensor([1., 1.]) is not one of 1..5"),
    ("config", [1], "its config is not a dict"), ("config/data_root", 5, "its config's data_root 5 is not a name"),
    ("model", ["lenet"], "its model name ['lenet'] is not a name"),
    ("temperature", "hot", "its temperature is 'hot', not a positive number"),
    ("ood", [1], "its out-of-distribution reference is not a dict"),
    ("ood/bank", lambda bank: bank[:, :10], "its out-of-distribution reference does not fit the network"),
    ("ood/thresholds/knn", "x", "its out-of-distribution reference does not fit the network"),
]


@pytest.mark.parametrize("key,value,says", EDITED, ids=[f"{i}-{k}" for i, (k, _, _) in enumerate(EDITED)])
def test_a_checkpoint_that_says_wrong_things_of_itself_is_one_line_in_every_reader(synthetic, trained, tmp_path,
                                                                                   key, value, says):
    bad = tmp_path / "edited.pt"
    torch.save(_edit(torch.load(trained / "best.pt", weights_only=True), key, value), bad)
    photo = next(synthetic.rglob("*.jpg"))
    for script, args in (("testing.py", ["--checkpoint", bad, "--out", tmp_path / "t"]),
                         ("gradcam.py", ["--checkpoint", bad, photo, "--out", tmp_path / "g"]),
                         ("serve.py", ["--checkpoint", bad, "--benchmark", "--requests", 1, "--device", "cpu"])):
        assert_one_line_error(run_cli(script, *args), "edited.pt", says)


def test_an_init_or_a_resume_that_says_wrong_things_of_itself_is_one_line(synthetic, trained, tmp_path):
    bad = tmp_path / "edited.pt"
    torch.save(_edit(torch.load(trained / "best.pt", weights_only=True), "fold", "abc"), bad)
    for script, args in (("train.py", train_args(synthetic, tmp_path / "r", "--epochs", 1)),
                         ("simclr.py", ["--data-root", synthetic, "--out", tmp_path / "s"])):
        assert_one_line_error(run_cli(script, *args, "--init", bad), "edited.pt", "its fold 'abc' is not one of 1..5")
    run = tmp_path / "edited-run"
    run.mkdir()
    last = torch.load(trained / "last.pt", weights_only=True)
    for ckpt, *says in ((_edit(last, "config", None), "its config is not a dict"),
                        (_edit(last, "state_dict", lambda s: dict(list(s.items())[1:])),
                         "its weights do not fit this model", "Missing key(s)"),
                        (torch.load(trained / "best.pt", weights_only=True), "holds no optimizer state, so --resume")):
        torch.save(ckpt, run / "last.pt")  # the last: a best.pt copied over last.pt (a KeyError traceback before)
        assert_one_line_error(run_cli("train.py", *train_args(synthetic, run, "--epochs", 40, "--batch-size", 16,
                                                              "--resume")), "last.pt", *says)  # `trained`'s flags
    torch.save(last, run / "last.pt")  # whole, but without the average that --ema added on resuming would need:
    with pytest.raises(ModelError, match="--ema was 0.0, now 0.9"):  # the changed flag is named, not the missing part
        resume(run / "last.pt", {**last["config"], "ema": 0.9}, train.RUNTIME_KEYS, train.DEFAULTS,
               build_model("lenet", 6), ema=object())


def test_another_projects_checkpoint_says_how_to_pass_its_weights(synthetic, tmp_path):
    """pytorch/examples and Lightning save {'epoch': ..., 'state_dict': ...}: it was called damaged
    ("its model name None is not a name"); the line now says how to pass its weights, and that works."""
    weights = build_model("lenet", 6).backbone.state_dict()  # a bare network's, as --init takes them
    torch.save({"epoch": 90, "arch": "lenet", "state_dict": weights}, tmp_path / "theirs.pt")
    proc = run_cli("train.py", *train_args(synthetic, tmp_path / "r", "--epochs", 1, "--init", tmp_path / "theirs.pt"))
    assert_one_line_error(proc, "theirs.pt: another project's checkpoint", "torch.save(checkpoint['state_dict']")
    torch.save(torch.load(tmp_path / "theirs.pt", weights_only=True)["state_dict"], tmp_path / "weights.pt")
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 1, "--init", tmp_path / "weights.pt")) == 0


def test_every_script_takes_a_run_directory_for_its_checkpoint(synthetic, trained, trained_all, tmp_path):
    """As testing.py always did: `--checkpoint runs/x` means runs/x/best.pt; a --fold all run where one
    checkpoint is needed is one line naming a fold's."""
    photo = next(synthetic.rglob("*.jpg"))
    done = run_cli("gradcam.py", "--checkpoint", trained, photo, "--out", tmp_path / "g")
    assert done.returncode == 0 and (tmp_path / "g" / "grid.png").is_file(), done.stderr
    done = run_cli("serve.py", "--checkpoint", trained, "--benchmark", "--requests", 1, "--device", "cpu")
    assert done.returncode == 0 and "requests/s" in done.stdout, done.stderr
    assert run_cli("testing.py", "--checkpoint", trained, "--out", tmp_path / "t").returncode == 0
    for script, extra in (("gradcam.py", [photo]), ("serve.py", [])):
        assert_one_line_error(run_cli(script, "--checkpoint", trained_all, *extra), "a --fold all run",
                              f"--checkpoint {trained_all / 'fold1'}")
    done = run_cli("gradcam.py", "--checkpoint", trained_all, "--fold", 2, "--limit", 2, "--out", tmp_path / "g2")
    assert done.returncode == 0 and json.loads((tmp_path / "g2" / "config.json").read_text())["fold"] == 2
    assert_one_line_error(run_cli("serve.py", "--checkpoint", tmp_path / "nowhere"), "no such checkpoint")


def _cut_run(synthetic, out, monkeypatch, *extra):
    """A run killed during its second epoch (last.pt holds the first)."""
    revive = killed_on_call(monkeypatch, train, "validate", 2)
    assert train.main(train_args(synthetic, out, "--epochs", 2, "--save-every", 0, *extra)) == 130
    revive()


def test_a_moved_run_resumes_however_its_folder_is_spelled(synthetic, tmp_path, monkeypatch):
    _cut_run(synthetic, tmp_path / "first", monkeypatch)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    args = train_args(synthetic, "./moved/", "--epochs", 2, "--save-every", 0, "--resume")
    proc = run_cli("train.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch 1" in proc.stdout
    assert torch.load(tmp_path / "moved" / "last.pt", weights_only=True)["epoch"] == 2


def test_resume_on_other_data_or_of_another_kind_of_run_is_one_line(synthetic, tmp_path, monkeypatch):
    out = tmp_path / "r"
    _cut_run(synthetic, out, monkeypatch)
    other = tmp_path / "other"
    shutil.copytree(synthetic, other)
    _cut_run(other, tmp_path / "on-other", monkeypatch)
    index_split(other, 1, "Train")[0][0].unlink()
    proc = run_cli("train.py", *train_args(other, out, "--epochs", 2, "--save-every", 0, "--resume"))
    assert_one_line_error(proc, "the data differs", "train_images", f"--data-root {synthetic}")
    assert "--train-images" not in proc.stderr
    proc = run_cli("train.py", *train_args(other, tmp_path / "on-other", "--epochs", 2, "--save-every", 0, "--resume"))
    assert_one_line_error(proc, f"the images in {other} have changed since the run began", "train_images",
                          "--overwrite")  # not "resume with the dataset it trained on (--data-root <the same>)"
    proc = run_cli("train.py", *train_args(synthetic, out, "--epochs", 2, "--save-every", 0, "--resume",
                                           "--fold", "all"))
    assert_one_line_error(proc, "one-fold run", "fold 1")
    assert not (out / "fold2").exists()


def test_a_second_run_into_one_folder_is_refused(synthetic, trained, tmp_path):
    out = tmp_path / "busy"
    with contextlib.ExitStack() as held:
        claim_run_dir(out, False, False, held, "train.py")  # as another train.py running there would
        proc = run_cli("train.py", *train_args(synthetic, out, "--epochs", 1))
        assert_one_line_error(proc, "in use by another run", str(os.getpid()))
    assert not (out / "best.pt").exists()


def test_a_finished_run_is_replaced_only_when_asked(synthetic, trained, tmp_path):
    out = tmp_path / "done"
    shutil.copytree(trained, out)
    before = (out / "best.pt").read_bytes()
    assert_one_line_error(run_cli("train.py", *train_args(synthetic, out, "--epochs", 1)), "holds a run already",
                          "--resume", "--overwrite")
    assert (out / "best.pt").read_bytes() == before
    assert train.main(train_args(synthetic, out, "--epochs", 1, "--overwrite")) == 0
    assert torch.load(out / "best.pt", weights_only=True)["config"]["epochs"] == 1
    assert len((out / "history.csv").read_text().splitlines()) == 2
    assert_one_line_error(run_cli("simclr.py", "--data-root", synthetic, "--out", out, "--epochs", 1), "holds a run")


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def test_an_overwrite_refused_before_it_writes_keeps_the_old_run_whole(synthetic, trained, trained_all, tmp_path):
    """--overwrite replaces the old run once the new one writes: a typo caught after the run directory
    was claimed (--model, --init) or a fold's folder in use loses none of the old run's files."""
    for src, extra in ((trained, []), (trained_all, ["--fold", "all"])):
        out = tmp_path / src.name
        shutil.copytree(src, out)
        before = _files(out)
        assert_one_line_error(run_cli("train.py", *train_args(synthetic, out, "--overwrite", "--model", "resnet1",
                                                              *extra)), "--model resnet1")
        assert _files(out) == before
    with contextlib.ExitStack() as held:
        claim_run_dir(tmp_path / trained_all.name / "fold3", True, False, held, "train.py")  # a run going on there
        proc = run_cli("train.py", *train_args(synthetic, tmp_path / trained_all.name, "--overwrite", "--fold", "all"))
        assert_one_line_error(proc, "fold3: in use by another run")
    assert _files(tmp_path / trained_all.name) == before


def test_files_an_overwrite_killed_outright_set_aside_are_pointed_out_and_kept(synthetic, trained, tmp_path):
    """kill -9 during --overwrite leaves the old run's files in a hidden folder (nothing can move them
    back): the next run in that directory says where they are, and leaves them."""
    out = tmp_path / "run"
    aside = out / ".replaced-by-4242-abc"  # as a killed --overwrite of process 4242 leaves them
    aside.mkdir(parents=True)
    shutil.copy(trained / "best.pt", aside / "best.pt")
    proc = run_cli("train.py", *train_args(synthetic, out, "--epochs", 1))
    assert proc.returncode == 0, proc.stderr
    assert f"note: {aside} holds the files of a run that an --overwrite killed outright had set aside" in proc.stdout
    assert (aside / "best.pt").read_bytes() == (trained / "best.pt").read_bytes()


def test_a_run_refused_before_it_writes_leaves_no_folder(synthetic, tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert train.main(train_args(synthetic, tmp_path / "new" / "run", "--init", missing)) == 2
    assert not (tmp_path / "new").exists()  # neither the run's folder nor the one made for it
    (tmp_path / "mine").mkdir()
    assert train.main(train_args(synthetic, tmp_path / "mine", "--fold", "all", "--init", missing)) == 2
    assert list((tmp_path / "mine").iterdir()) == []  # the user's folder stays, as empty as it was
    assert capsys.readouterr().err.count("no such checkpoint") == 2


def test_a_diverging_run_stops_with_one_line_naming_the_epoch(synthetic, tmp_path):
    proc = run_cli("train.py", *train_args(synthetic, tmp_path / "r", "--epochs", 3, "--lr", 1e3))
    assert_one_line_error(proc, "epoch 1", "diverged", "--overwrite", "--lr")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 1e3  # the run is there to look at
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 1, "--overwrite")) == 0  # as the line says
    simclr_args = ["--data-root", synthetic, "--out", tmp_path / "s", "--epochs", 2, "--optimizer", "sgd", "--device",
                   "cpu"]
    assert_one_line_error(run_cli("simclr.py", *simclr_args, "--lr", 1e8), "epoch 1", "diverged", "--overwrite",
                          "--lr")
    assert run_cli("simclr.py", *simclr_args, "--lr", 0.01, "--overwrite").returncode == 0


def test_a_run_that_diverges_later_keeps_a_whole_best_pt(synthetic, tmp_path, monkeypatch, capsys):
    real, seen = train.validate, []

    def nan_from_epoch_2(*args):
        metrics, logits = real(*args)
        seen.append(1)
        return dict(metrics, valid_loss=float("nan") if len(seen) >= 2 else metrics["valid_loss"]), logits
    monkeypatch.setattr(train, "validate", nan_from_epoch_2)
    assert train.main(train_args(synthetic, tmp_path / "r", "--epochs", 3)) == 2
    err = capsys.readouterr().err
    assert "epoch 2: the loss is nan" in err and "keeps epoch 1" in err
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and best["ood"]["thresholds"]  # with its out-of-distribution reference, as at the end


# ----------------------------------------------------------------------------- a full disk
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_one(small_disk, synthetic, tmp_path):
    small = checkpoint_dict(build_model("lenet", 6), "classifier", list("abcdef"), {}, 1, {})
    save_checkpoint(small, small_disk / "best.pt")  # about 250 KB of the 400
    big = dict(small, filler=torch.zeros(100_000))  # 400 KB more: does not fit
    with pytest.raises(WriteError, match=r"best\.pt: could not be written \(No space left on device\); the previous"):
        save_checkpoint(big, small_disk / "best.pt")
    assert torch.load(small_disk / "best.pt", weights_only=True)["epoch"] == 1
    assert [p.name for p in small_disk.iterdir()] == ["best.pt"]  # no temporary file left behind
    (small_disk / "best.pt").unlink()
    proc = run_cli("train.py", *train_args(synthetic, small_disk / "run", "--epochs", 1))
    assert_one_line_error(proc, "could not be written", "No space left on device")


def test_a_read_only_folder_is_one_line_naming_the_output_before_any_work(small_disk, synthetic, trained,
                                                                            monkeypatch):
    """A folder that cannot be written in (a read-only mount here; not ours, for a user) is refused by
    name before any work, by every script, as a file in the way is; and a write that fails there
    anyway (EROFS on the temporary beside the output) is one line naming the output."""
    def work(*a, **k):
        raise AssertionError("the folder is refused only after the work")
    for module, name in ((train, "fit_fold"), (simclr, "_pretrain"), (testing, "evaluate_fold"),
                         (augment, "_write_one"), (getData, "synthetic_image")):
        monkeypatch.setattr(module, name, work)
    (small_disk / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(WriteError, match=r"x\.json: could not be written; .*disk: cannot write in this folder "
                                         r"\(read-only file system\)"):
        getData.atomic_write(small_disk / "x.json", "{}")
    for script, args in (("train.py", train_args(synthetic, small_disk / "run", "--epochs", 1)),
                         ("simclr.py", ["--data-root", synthetic, "--out", small_disk / "run", "--epochs", 1]),
                         ("testing.py", ["--checkpoint", trained / "best.pt", "--out", small_disk / "run" / "t"]),
                         ("augment.py", ["--data-root", synthetic, "--out", small_disk / "aug"]),
                         ("getData.py", ["--synthetic", small_disk / "syn"])):
        assert_one_line_error(run_cli(script, *args), "cannot write in", "read-only file system")
    assert [p.name for p in small_disk.iterdir()] == ["run"] and not list((small_disk / "run").iterdir())


def test_a_folder_that_is_not_ours_is_one_line_naming_the_nearest_folder(tmp_path, monkeypatch):
    """As a user who is not root meets a folder of another's (root, who runs these tests, may write
    anywhere): the nearest existing folder of the path is named, and why."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != theirs and real_access(p, mode))
    with pytest.raises(WriteError, match=r"theirs/run/fold1: cannot write in .*theirs \(permission denied\)"):
        getData.make_folder(theirs / "run" / "fold1")
    assert list(theirs.iterdir()) == []
    assert getData.check_folder(tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_a_name_longer_than_a_file_system_takes_is_one_line(synthetic, trained, tmp_path):
    """Python raises ENAMETOOLONG at the first look at such a path (even whether it exists): a
    traceback from wherever that was, or the system's bare '[Errno 36]'."""
    long = tmp_path / ("a" * 300)
    for script, args in (("train.py", train_args(synthetic, long, "--epochs", 1)), ("train.py", ["--data-root", long]),
                         ("testing.py", ["--checkpoint", long]),
                         ("testing.py", ["--checkpoint", trained, "--out", long]),
                         ("gradcam.py", ["--checkpoint", trained, long / "x.jpg"])):
        assert_one_line_error(run_cli(script, *args), "a name in this path is longer than the 255 bytes")
    assert list(tmp_path.iterdir()) == []
