"""MSLD v2.0 data: find it, audit it, load it, cache it, or generate a synthetic stand-in.

    python getData.py --data-root PATH            # table of images per class/fold/split + audit
    python getData.py --data-root PATH --report audit.json
    python getData.py --synthetic [PATH] --seed 0 # small generated dataset in the MSLD layout
    python getData.py --download URL|kaggle       # fetch and safely extract a zip
    python getData.py --extract archive.zip       # safely extract a zip downloaded by hand

Everything else in the repository imports its data from here: the class list, `load_image`
(EXIF, odd modes, pixel limit), the fold/split index, `MSLDDataset` and its in-memory uint8 cache.
And what every script needs for files and mistakes: `atomic_path`/`atomic_write` (a whole output or
none), `to_json` (strict JSON), `UserError` and `run_main` (a user's mistake is one line and exit status 2).
"""
import argparse
import base64
import concurrent.futures
import contextlib
import copy
import errno
import glob
import hashlib
import http.client
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError
from tqdm import tqdm

DEFAULTS = dict(
    data_root="data",
    synthetic_root="data/synthetic",
    seed=0,
)

FOLDS = (1, 2, 3, 4, 5)
SPLITS = ("Train", "Valid", "Test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}  # file names of IMAGE_FORMATS
# The decoders a photo may reach, whatever its name says (JPEG's also opens a phone's multi-picture
# MPO). Pillow would otherwise try every format it knows on an upload, EPS included: Ghostscript.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# File-name prefix -> class folder, from the dataset's naming key (Keywords.jpg).
PREFIX_CLASS = {"MKP": "Monkeypox", "CHP": "Chickenpox", "CWP": "Cowpox", "MSL": "Measles",
                "HFMD": "HFMD", "HEALTHY": "Healthy"}
POSITIVE_CLASS = "Monkeypox"  # the clinical question is Mpox vs the rest
# Phone photos are 12-50 MP; anything far above that is a decompression bomb, not a lesion photo.
MAX_PIXELS = 64_000_000
SYNTHETIC_MARKER = "SYNTHETIC.txt"
AUG_TAG = "__aug"  # augment.py names copies NAME__augNN.ext so their origin stays traceable
KAGGLE_API = "https://www.kaggle.com/api/v1"
KAGGLE_DATASET = "joydippaul/mpox-skin-lesion-dataset-version-20-msld-v20"


UMASK = os.umask(0o022)  # read (os.umask can only be read by setting it) and put back at once
os.umask(UMASK)


class UserError(Exception):
    """A user's mistake (a path, a flag, a file): every script reports it as one line, exit status 2."""
    quiet = False  # True where another process says it (under torchrun, rank 0 for every rank)


class DataError(UserError):
    """A problem with the user's data or paths."""


class ImageTooLarge(DataError):
    """An image whose pixel count is over MAX_PIXELS (serve.py answers it with HTTP 413)."""


class WriteError(UserError):
    """An output that could not be written (a full disk, a file where a folder should be, ...)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, `timeout`, a scheduler's time limit), met as Ctrl-C is: the same unwinding
    (temporary files removed, helper processes stopped) and one line, exit status 143."""


# The stop a signal asked for (KeyboardInterrupt or Terminated), kept beyond the exception it raises:
# Python runs a handler wherever the main thread is, a finalizer (`__del__`) included, which drops what
# it raises. The run then goes on: training loops end it at their next step (stop_if_asked), and
# what fails in its own way meanwhile (under torchrun, the next collective finds the other ranks gone:
# "Connection closed by peer") on_interrupt reports as the stop, not as that.
_stop_asked: type | None = None


def _interrupted(signum, frame):
    global _stop_asked
    _stop_asked = KeyboardInterrupt
    raise KeyboardInterrupt


def _terminated(signum, frame):
    global _stop_asked
    _stop_asked = Terminated
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one cannot cut the unwinding short
    raise Terminated


def stop_if_asked() -> None:
    """Raise the stop a signal asked for, if a finalizer swallowed it: a training loop calls this once a
    step, so a Ctrl-C that landed in a `__del__` still stops the run within a step (it went on to the
    end, or to a second Ctrl-C)."""
    if _stop_asked is not None:
        raise _stop_asked()


NAME_MAX = 255  # bytes in one file or folder name: ext4, XFS, Btrfs, APFS (NTFS: 255 UTF-16 units)


def run_main(body, *args) -> int:
    """Every script's main(): run `body`; a user mistake is one 'error:' line and exit status 2."""
    for stream in (sys.stdout, sys.stderr):  # a file name the terminal cannot encode is shown escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    global _stop_asked
    _stop_asked, main = None, threading.current_thread() is threading.main_thread()
    # Not under torchrun, which ends every rank with SIGTERM when one fails: they stay silent, it reports
    takes_sigterm = main and "TORCHELASTIC_RUN_ID" not in os.environ
    before = signal.signal(signal.SIGTERM, _terminated) if takes_sigterm else None
    takes_sigint = main and signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not if ignored (nohup)
    before_sigint = signal.signal(signal.SIGINT, _interrupted) if takes_sigint else None
    try:
        with warnings.catch_warnings():  # restored when the command ends (a notebook, a test goes on)
            quiet_pillow()
            body(*args)
        return 0
    except UserError as e:
        if not e.quiet:
            sys.stderr.write(f"error: {one_line(str(e))}\n")  # one write: under torchrun, ranks' never interleave
        return 2
    except OSError as e:  # a path given with a name longer than file systems take: every look at it raises
        if e.errno != errno.ENAMETOOLONG:
            raise
        sys.stderr.write(f"error: {one_line(too_long(e))}\n")
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C is a choice, not a crash: what was saved stays (atomic writes)
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has it: rank 0 says it
            sys.stderr.write(f"\n{stopped}{''.join(f': {a}' for a in e.args)}\n")
        return 143 if isinstance(e, Terminated) else 130  # the shell's status for SIGTERM, SIGINT
    finally:
        _stop_asked = None  # this run's: a caller of the functions after main() (a notebook, a test) is not stopped
        if takes_sigterm:
            signal.signal(signal.SIGTERM, before)
        if takes_sigint:
            signal.signal(signal.SIGINT, before_sigint)


def quiet_pillow() -> None:
    """Leave Pillow's warnings about a file unsaid in this process: its plugins warn ("Truncated File
    Read", "Corrupt EXIF data") ahead of load_image's own line naming that file, or of a decode that
    succeeds anyway. For a command's length in run_main; for their life in the processes a command
    spawns (a spawned process starts with the default filters, not its parent's)."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def too_long(e: OSError) -> str:
    """What ENAMETOOLONG means to a user, for the path it names."""
    return f"{e.filename}: a name in this path is longer than the {NAME_MAX} bytes a file system takes; choose a " \
           "shorter one"


def one_line(message: str) -> str:
    """A message stays one line when it quotes a name with a newline or a tab in it (a path, a flag's
    value): such characters are shown as Python writes them, `\\n`."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


@contextlib.contextmanager
def on_interrupt(how_to_go_on: str):
    """Ctrl-C (or SIGTERM) inside: run_main's one line says how to go on. An error after a stop whose
    exception a finalizer swallowed is that stop's consequence, and reported as the stop."""
    try:
        yield
    except KeyboardInterrupt as e:
        raise type(e)(how_to_go_on) from None
    except Exception:
        if _stop_asked is None:
            raise
        raise _stop_asked(how_to_go_on) from None


@contextlib.contextmanager
def spawned_deaf_to_ctrl_c():
    """Processes spawned inside the block start with Ctrl-C ignored (an ignored signal stays ignored
    through exec), so one pressed while they import torch, their first seconds, prints no traceback
    of theirs: the parent handles it, and what they do with it once ready is theirs to set. This
    process ignores it too for the block's milliseconds. Only the main thread may set handlers."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, before)


def resumable(out):
    """A run that --resume continues."""
    return on_interrupt(f"the same command with --resume continues {out} from its last saved epoch")


# ----------------------------------------------------------------------------- command lines
class Number:
    """An argparse `type`: a finite int or float within [low, high] (`open`: bounds excluded), so that
    `--lr nan`, `--label-smoothing 2` or `--batch-size 0` are one line, never a traceback or a silent
    run."""

    def __init__(self, kind=float, low=None, high=None, open_low=False, open_high=False):
        self.kind, self.low, self.high, self.open_low, self.open_high = kind, low, high, open_low, open_high
        self.__name__ = kind.__name__  # argparse names the type in "invalid float value"

    def __call__(self, text: str):
        value = self.kind(text)  # ValueError: argparse reports "invalid int value"
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: not a finite number; give {self.allowed()}")
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text}: out of range; give {self.allowed()}")
        return value

    def allowed(self) -> str:
        what, as_text = ("an integer", str) if self.kind is int else ("a number", lambda x: f"{x:g}")  # 1e+10
        low = f"{'>' if self.open_low else '>='} {as_text(self.low)}" if self.low is not None else ""
        high = f"{'<' if self.open_high else '<='} {as_text(self.high)}" if self.high is not None else ""
        return f"{what} {' and '.join(b for b in (low, high) if b)}".strip()


SEED = Number(int, 0, 2**63 - 1)  # every script's --seed: what every generator here takes (torch's included)


class _ShowDefaults(argparse.HelpFormatter):
    """--help names each flag's default where it has one worth saying (not None, off, or empty), also
    for a flag without a help text (argparse would print nothing after it)."""

    def _format_action(self, action):
        if not action.help and self._worth_saying(action.default):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if not self._worth_saying(action.default) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"

    @staticmethod
    def _worth_saying(default) -> bool:
        return not (default is None or default is False or default == [] or default is argparse.SUPPRESS)


def _not_empty(text: str) -> str:
    """A text value, refused when empty: `--out "$OUT"` with OUT unset meant the current folder as a
    path (simclr.py --extra and testing.py --ood-dir searched it for images) or the default elsewhere."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: an empty value (an unset shell variable?); give one or leave "
                                         "the flag out")
    return text


class Parser(argparse.ArgumentParser):
    """Every script's argument parser: a mistake is one 'error:' line (argparse's usage line is left
    to --help), prefixes of long flags are not guessed, a bare `type=int` or `type=float` means a
    finite Number, so that no numeric flag escapes the check (argparse's type registry), and no text
    value is empty."""

    def __init__(self, doc: str, script: str):
        """`doc`: the script's docstring (its first paragraph describes it); `script`: its __file__."""
        super().__init__(prog=Path(script).name, description=doc.split("\n\n")[0], allow_abbrev=False,
                         formatter_class=_ShowDefaults)
        self.register("type", int, Number(int))
        self.register("type", float, Number(float))
        self.register("type", None, _not_empty)  # every flag without a type of its own

    def error(self, message):
        # "argument --lr: nan: not a finite number; ..." -> "--lr nan: not a finite number; ...", the project's form
        message = re.sub(r"^argument (\S+?)(?:/\S+)?: ", r"\1 ", message)
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def refuse_unused(args, defaults: dict, names, why: str) -> None:
    """One line for the first of `names` given (a value other than its default, or a `store_true`
    flag set) where the command would not use it: ignored without a word, it ran other settings than
    the user meant (a federated run without the MixUp asked for)."""
    given = [n for n in names if getattr(args, n) != defaults.get(n) and getattr(args, n) is not False]
    if given:
        value = getattr(args, given[0])
        raise DataError(f"--{given[0].replace('_', '-')}{'' if value is True else f' {value}'} {why}")


# ----------------------------------------------------------------------------- writing files
def check_folder(path) -> Path:
    """Refuse now, creating nothing, a folder path that a file stands in the way of, or whose nearest
    existing folder cannot be written in (read-only, not ours): before the work, not after it."""
    path = Path(path)
    nearest = _nearest_existing(path)
    if not nearest.is_dir():
        raise WriteError(f"{path}: cannot make this folder, {nearest} is a file; choose another path")
    if not os.access(nearest, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(nearest).f_flag & os.ST_RDONLY else "permission denied"
        where = "this folder" if nearest == path else nearest
        raise WriteError(f"{path}: cannot write in {where} ({why}); choose another path")
    return path


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists ("." or "/" at the latest). os.path.exists: False
    below a folder we may not enter, where Python 3.11's Path.exists raises."""
    return next(q for q in [path, *path.parents] if os.path.exists(q))


def _not_a_folder(path: Path) -> str:
    """Why `path` cannot be read as a folder."""
    return "a file, not a folder" if path.exists() else "no such folder"


def make_folder(path) -> Path:
    """mkdir -p, or one line saying which part of the path is in the way."""
    path = check_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path}: cannot make this folder ({e.strerror})") from None
    return path


@contextlib.contextmanager
def atomic_path(path, folder: bool = False):
    """Yield a temporary file (or folder) beside `path`; it becomes `path` only if the block completes.

    A crash or an exception leaves the previous `path` (or nothing), never half an output; a write
    that fails (a full disk) is one line naming `path`. The temporary name is unique, so two
    processes writing the same file never write into each other's. A folder target that exists is
    replaced whole (callers refuse one holding what is not theirs first), so nothing of the earlier
    contents stays beside the new; a folder a link names stays the link's, and the current folder is
    refused. A link, a device or a named pipe (`--report /dev/null`, `/dev/stdout`) is written
    through, as the shell's `>` would: a temporary renamed over it would replace the link or the
    device node itself (as root, /dev/null).
    """
    path = Path(path)
    if path.is_dir() and not folder:
        raise WriteError(f"{path}: is a folder; cannot write a file there")
    if folder:
        path = path.resolve()  # a folder a link names stays the link's; `.` has a name and a parent
        if Path.cwd().is_relative_to(path):  # a shell there would be left in a deleted folder
            raise WriteError(f"{path}: the current folder, or one holding it, which the outputs would replace; "
                             "choose a folder elsewhere, or a new one inside it")
    if not folder and (path.is_symlink() or (path.exists() and not path.is_file())):
        try:
            yield path
        except OSError as e:
            raise WriteError(f"{path}: could not be written ({e.strerror or e})") from None
        return
    try:
        make_folder(path.parent)
    except WriteError as e:
        raise WriteError(f"{path}: could not be written; {e}") from None
    try:  # a folder that cannot be written in (read-only, /proc) refuses the temporary already
        tmp = _temporary_beside(path, folder)
    except OSError as e:
        raise _not_written(path, e) from None
    try:
        yield tmp
        if folder and path.exists():
            _replace(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        raise _not_written(path, e) from None
    except UserError as e:  # a file inside the temporary folder not written: named where it was going
        e.args = tuple(str(a).replace(str(tmp), str(path)) for a in e.args)
        raise
    finally:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _replace(new: Path, folder: Path) -> None:
    """os.replace for a folder that holds files: the old one set aside, the new one put in its place,
    the old one deleted (or put back, if the new one cannot take its place)."""
    aside = _temporary_beside(folder, True)
    try:
        os.replace(folder, aside / "old")
        try:
            os.replace(new, folder)
        except OSError:
            os.replace(aside / "old", folder)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _temporary_beside(path: Path, folder: bool) -> Path:
    """A new hidden file or folder beside `path`, named after it (shortened, so that a name near the
    file system's 255 bytes still leaves room) and after this process: a folder that one killed
    outright (kill -9) left half-written is deleted when the next one is made beside it."""
    name = f".{os.fsencode(path.name)[:64].decode(errors='ignore')}."
    if folder:
        for stale in path.parent.glob(f"{glob.escape(name)}*"):
            if (pid := re.fullmatch(r"(\d+)-\w{8}", stale.name[len(name):])) and not _running(int(pid[1])):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}{os.getpid()}-", dir=path.parent))
    else:
        handle, tmp_name = tempfile.mkstemp(prefix=f"{name}{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.close(handle)
        tmp = Path(tmp_name)
    tmp.chmod((0o777 if folder else 0o666) & ~UMASK)  # as open() and mkdir() would have made it, not private
    return tmp


def _running(pid: int) -> bool:
    if os.name == "nt":  # where os.kill(pid, 0) would end the process: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def _not_written(path: Path, e: OSError) -> WriteError:
    what = "the previous one is unchanged" if path.exists() else "nothing was written"
    return WriteError(f"{path}: could not be written ({e.strerror or e}); {what}")


def to_json(obj, **kwargs) -> str:
    """JSON that strict readers (jq, JavaScript's JSON.parse) take: a number that is not finite, such
    as the Mpox sensitivity of a network trained without Mpox, is null, never the token NaN."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj):
    if isinstance(obj, float):  # numpy's float64 too
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write(path, data: str | bytes) -> None:
    """Write a whole file or nothing. Text is UTF-8; file names that are not (undecodable bytes on
    disk, kept by Python as surrogates) are written back as the bytes they were."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8", errors="surrogateescape")


# ----------------------------------------------------------------------------- layout
def _has_folds(path: Path) -> bool:
    return path.is_dir() and all((path / f"fold{k}").is_dir() for k in FOLDS)


def dataset_holding(path) -> Path | None:
    """The dataset (a folder holding fold1..5 and their splits) that `path` is or lies in; None outside
    every one. The splits tell it from a --fold all run's folder, which holds fold1..5 too."""
    path = Path(path).resolve()
    return next((q for q in (path, *path.parents) if _has_folds(q) and all((q / "fold1" / s).is_dir()
                                                                            for s in SPLITS)), None)


def outside_datasets(path, flag: str = "--out") -> Path:
    """`path`, refused when it is or lies in a dataset: an output there becomes data (a figure written
    into a class folder is an image of that class to the next run, a folder in a split a new class)."""
    inside = dataset_holding(path)
    if inside is not None:
        raise WriteError(f"{flag} {path}: inside the dataset {inside}, where outputs would become data; choose a "
                         "folder outside it")
    return Path(path)


def _layouts(base: Path):
    """The places a FOLDS folder sits in after users unzip MSLD v2.0."""
    yield base
    yield base / "FOLDS"
    yield base / "Original Images" / "FOLDS"
    yield base / "Original Images" / "Original Images" / "FOLDS"


def find_folds_root(data_root) -> Path:
    """Return the folder holding fold1..fold5 under `data_root` (or one level below it).

    Real datasets win over the synthetic one when both are present (`_the_one`).
    """
    root = Path(data_root)
    if root.is_file() and (hint := _zip_hint(root)):
        raise DataError(f"{root}: a zip archive, not a folder{hint}")
    if not root.is_dir():
        raise DataError(f"{root}: {_not_a_folder(root)}; pass --data-root with your MSLD v2.0 download or run "
                        "`python getData.py --synthetic`")
    bases = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    found = [p for b in bases for p in _layouts(b) if _has_folds(p)]
    runs = [p for p in found if (p / "fold1" / "config.json").is_file()]  # train.py --fold all's: fold1..5 too
    found = [p for p in found if p not in runs]
    if runs and not found:
        raise DataError(f"{runs[0]}: a --fold all run of train.py (its checkpoints, not photos); give --data-root "
                        "the folder that holds MSLD v2.0")
    if not found:
        partial = [p for b in bases for p in _layouts(b) if (p / "fold1").is_dir()]
        if partial:
            missing = [f"fold{k}" for k in FOLDS if not (partial[0] / f"fold{k}").is_dir()]
            raise DataError(f"{partial[0]}: missing {', '.join(missing)}; "
                            "MSLD v2.0 has fold1..fold5, re-extract the download")
        inside = dataset_holding(root)
        if inside is not None:  # a fold's (or a split's, a class's) folder: the data root is above it
            raise DataError(f"{root}: a folder inside the dataset; give --data-root {inside} (the folder holding "
                            "fold1..5), the scripts pick folds and splits themselves (--fold)")
        raise DataError(f"{root}: no MSLD v2.0 layout found (expected "
                        "'Original Images/Original Images/FOLDS/fold1..5/{Train,Valid,Test}/<Class>/')"
                        f"{_zip_hint(root) or '; check --data-root or run `python getData.py --synthetic`'}")
    return _the_one(root, found)


def _the_one(root: Path, found: list[Path]) -> Path:
    """Of the datasets found under `root`, the one to use: a real one over the synthetic set. Two of
    one kind (a second unzip, a copy) are refused: which data a run saw must not hang on folder names."""
    unique = {}
    for p in [p for p in found if not is_synthetic(p)] or found:
        unique.setdefault(p.resolve(), p)  # a dataset reached twice (two layouts, a link) is one
    if len(unique) > 1:
        raise DataError(f"{root}: holds {len(unique)} datasets ({', '.join(map(str, unique.values()))}); give "
                        "--data-root the one to use, or move the other away")
    return next(iter(unique.values()))


def _zip_hint(root: Path) -> str:
    """Where the dataset should be, the download itself (a zip passed, or left unextracted): how to
    extract it."""
    zips = [z for z in ([root] if root.is_file() else sorted(root.glob("*.zip"))) if zipfile.is_zipfile(z)]
    return f"; extract {zips[0]} with `python getData.py --extract '{zips[0]}'`" if zips else ""


def _found_any(data_root) -> bool:
    try:
        find_folds_root(data_root)
        return True
    except DataError:
        return False


def is_synthetic(folds_root: Path) -> bool:
    return (Path(folds_root) / SYNTHETIC_MARKER).exists()


def resolve_data_root(data_root, synthetic_root=DEFAULTS["synthetic_root"], seed=0) -> Path:
    """The main commands' data policy: use the dataset if one is found, else the synthetic set.

    Only the default location falls back; an explicit path that holds no dataset is an error. The
    path is absolute: a run records it, and testing.py finds the data from any folder.
    """
    try:
        return Path(os.path.abspath(usable_folds_root(data_root)))
    except DataError:
        if str(data_root) != DEFAULTS["data_root"] or (Path(data_root).is_dir() and _found_any(data_root)):
            raise
    print(f"no MSLD v2.0 found under {data_root}/: using the synthetic demo set in {synthetic_root}/ "
          f"(see README to get the real data{_zip_hint(Path(data_root))})")
    if not _has_folds(Path(synthetic_root)):
        if Path(synthetic_root).is_dir() and any(Path(synthetic_root).iterdir()):
            raise DataError(f"{synthetic_root}: holds files but not the synthetic set; delete it, and the same "
                            "command writes the set again")
        try:
            make_synthetic(synthetic_root, seed=seed)
        except (DataError, WriteError):  # two commands at once on a fresh clone: the other one wrote it first
            if not _has_folds(Path(synthetic_root)):
                raise
    return Path(os.path.abspath(synthetic_root))


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def images_under(folder) -> list[Path]:
    """Every image file below `folder`, at any depth, sorted (hidden files, such as macOS's `._`
    copies, left out)."""
    return files_under(folder)[0]


def files_under(folder) -> tuple[list[Path], str]:
    """images_under(folder), and what else it holds by file type ('12 .heic, 1 .txt', the five most
    common kinds and a count of the rest: a line, whatever the folder), in one walk."""
    files = [p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")]
    kinds = Counter(p.suffix.lower() or "files without a suffix" for p in files if not _is_image_file(p))
    others = [f"{n} {kind}" for kind, n in kinds.most_common(5)]
    if len(kinds) > 5:
        others.append(f"{sum(n for _, n in kinds.most_common()[5:])} of {len(kinds) - 5} other kinds")
    return sorted(filter(_is_image_file, files)), ", ".join(others)


def each_once(items, path=lambda item: item) -> list:
    """`items` in their order, each file once however its path is spelled or reached (a folder given
    and one inside it); `path(item)` is an item's file."""
    once = {}
    for item in items:
        once.setdefault(Path(path(item)).resolve(), item)
    return list(once.values())


def images_in(folders, flag: str = "") -> list[Path]:
    """Every image file below each of `folders` (given with `flag`, named in the message), each once
    however often it is named (a folder and one inside it): one line for a folder that is missing or
    holds no image, rather than a run on fewer photos than asked for."""
    found = []
    for d in map(Path, folders):
        where = f"{flag} {d}".strip()
        if not d.is_dir():
            raise DataError(f"{where}: {_not_a_folder(d)}")
        images, others = files_under(d)
        if not images:
            raise DataError(f"{where}: no images there ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                            + (f"; it holds {others}" if others else ""))
        if others and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it for all
            print(f"note: {where}: {others} left out, not being JPEG, PNG, WebP, BMP, TIFF or GIF files")
        found += images
    return each_once(found)


def is_class_folder(d: Path) -> bool:
    """A folder that can hold a class: not hidden, not an archiver's leftover such as __MACOSX/."""
    return d.is_dir() and not d.name.startswith((".", "__"))


def list_classes(folds_root) -> list[str]:
    """Class names = sorted class-folder names: the same index mapping in every script."""
    names = {d.name for k in FOLDS for s in SPLITS
             for d in (Path(folds_root) / f"fold{k}" / s).glob("*") if is_class_folder(d)}
    if not names:
        raise DataError(f"{folds_root}: no class folders under fold1..5/{{Train,Valid,Test}}/")
    for name in names:  # a label is text: in figures, reports and JSON (testing.py's plots stopped with a traceback)
        if name != os.fsencode(name).decode("utf-8", "replace"):
            shown = os.fsencode(name).decode("utf-8", "backslashreplace")
            raise DataError(f"{folds_root}: class folder name '{shown}' is not UTF-8 text (an archive from another "
                            "system, perhaps); rename it in every fold")
    return sorted(names)


def usable_folds_root(data_root) -> Path:
    """find_folds_root, refusing a layout the audit calls not usable (a class folder empty or missing
    in a split, a class in some folds only): training on it would add a class without images and
    shift the others' indices. One verdict for every script: the audit's structure_problems."""
    folds_root = find_folds_root(data_root)
    problems = structure_problems(folds_root, list_classes(folds_root))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; fix the dataset, `python getData.py --data-root {data_root}` "
                        "lists every problem")
    return folds_root


def list_images(folder) -> list[Path]:
    """Image files directly in `folder`, sorted, so every index is reproducible."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if _is_image_file(p)) if folder.is_dir() else []


def index_split(folds_root, fold: int, split: str, classes=None) -> list[tuple[Path, int]]:
    """(path, label) pairs for one fold and split."""
    if fold not in FOLDS:
        raise DataError(f"fold {fold} does not exist: MSLD v2.0 has folds 1..5")
    if split not in SPLITS:
        raise DataError(f"split {split!r} does not exist: use one of {', '.join(SPLITS)}")
    return _labelled(Path(folds_root) / f"fold{fold}" / split, classes or list_classes(folds_root))


def _labelled(folder: Path, classes) -> list[tuple[Path, int]]:
    """(path, label) pairs of the images in `folder`'s <Class>/ folders."""
    return [(p, label) for label, c in enumerate(classes) for p in list_images(folder / c)]


def augmented_samples(folder, classes) -> list[tuple[Path, int]]:
    """(path, label) pairs of a folder augment.py wrote (<Class>/ folders), or one line saying why it is
    not one: missing, other classes, or no images (a flag that would add nothing, without a word)."""
    d = Path(folder)
    if not d.is_dir():
        raise DataError(f"{d}: {_not_a_folder(d)}; give a folder that augment.py wrote (<Class>/ folders)")
    if inside := dataset_holding(d):  # a split's photos, added to Train a second time (or another fold's)
        raise DataError(f"{d}: a folder of the dataset {inside}, not augment.py's output; give a folder that "
                        "augment.py wrote")
    if unknown := sorted({p.name for p in d.iterdir() if is_class_folder(p)} - set(classes)):
        raise DataError(f"{d}: expected class folders {classes}, found {unknown}")
    if not (samples := _labelled(d, classes)):
        raise DataError(f"{d}: no images in <Class>/ folders; give a folder that augment.py wrote")
    return samples


# ----------------------------------------------------------------------------- decoding
def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, CMYK/palette/grey converted, 16-bit (and 32-bit
    integer or float) grey scaled from its full range to 8 bits."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float32)
        a = np.clip(a * 255.0 / _full_scale(im.mode, float(a.max(initial=0))), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _full_scale(mode: str, peak: float) -> float:
    """White for a grey image of more than 8 bits: 65535 for 16-bit files; for 32-bit integer or float
    pixels the smallest usual range holding the brightest one (1.0, 255, 65535). Not the image's own
    maximum: stretching each photo to white would change its brightness, and lesion colour is diagnostic."""
    if mode.startswith("I;16"):
        return 65535.0
    for top in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if peak <= top:
            return top
    return peak


def load_image(source, name: str | None = None, max_pixels: int = MAX_PIXELS, shrink_to: int | None = None,
               budget=None) -> Image.Image:
    """Decode one image safely: a path, bytes or file object in, an upright RGB PIL image out.

    Raises DataError (naming the file) for anything that is not a whole, readable image, and
    ImageTooLarge for a pixel count over `max_pixels`, checked from the header before any pixel is
    decoded. `shrink_to`: the shortest side the caller needs; a larger image is decoded smaller where
    the format allows it (JPEG's DCT scaling) and reduced by a whole factor right after decoding,
    before any copy, so a 48-megapixel photo costs a few megabytes. `budget`: an object whose
    `reserve(nbytes)` context holds the decoded size while the pixels exist (serve.py bounds the
    memory of concurrent decodes with it).
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "image")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)) and _a_pipe_or_device(source):  # opening a pipe waits for a writer,
        # and a second read (each photo is read twice: checked, then decoded) finds it empty
        raise DataError(f"{name}: a pipe or a device, not a file; save the photo to a file and give its path")
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise ImageTooLarge(f"{name}: {im.width}x{im.height} pixels is over the {max_pixels:,}-pixel "
                                    "limit; send a smaller photo")
            if shrink_to:
                im.draft(None, (shrink_to, shrink_to))  # JPEG: decode at 1/2, 1/4 or 1/8 scale (no-op otherwise)
            with budget.reserve(decoded_bytes(im, bool(shrink_to))) if budget else contextlib.nullcontext():
                im.load()  # raises on truncated data
                try:
                    return _to_rgb(ImageOps.exif_transpose(_shrink(im, shrink_to) if shrink_to else im))
                finally:  # the decoded pixels are freed inside their reservation (exif_transpose copies)
                    im.close()
    except DataError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, above ours: the same answer
        raise ImageTooLarge(f"{name}: over the {max_pixels:,}-pixel limit; send a smaller photo") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image ({_why_not_an_image(source)})") from None
    except (OSError, SyntaxError, ValueError) as e:  # the system's reason ("No such file"), or the decoder's
        why = e.strerror if isinstance(e, OSError) and e.strerror else _why_not_an_image(source, _detail(e, name))
        raise DataError(f"{name}: not a readable image ({why})") from None


def _a_pipe_or_device(path) -> bool:
    """Whether `path` is there but is neither a file nor a folder: a named pipe, `<(curl ...)`, /dev/zero."""
    return os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)


HEIF_NOTE = ("a HEIC, HEIF or AVIF image, as iPhones save by default; send it as JPEG or PNG (iPhone: Settings > "
             "Camera > Formats > Most Compatible)")
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}


SIGNATURES = {"JPEG": rb"\xff\xd8\xff", "PNG": rb"\x89PNG\r\n\x1a\n", "GIF": rb"GIF8[79]a", "WebP": rb"RIFF.{4}WEBP",
              "TIFF": rb"II\*\x00|MM\x00\*", "BMP": rb"BM.{4}\x00{4}"}  # the first bytes of each format read


def _why_not_an_image(source, detail: str | None = None) -> str:
    """What a file Pillow could not read is, from its first bytes: empty (a copy that failed), an image
    in an ISO base media file (HEIC, HEIF, AVIF: an 'ftyp' box and its brand at bytes 4 to 12), one of
    the formats read that does not decode (most often a download cut short; `detail`: the decoder's
    message), or something else."""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                head = f.read(12)
        else:
            source.seek(0)
            head = source.read(12)
    except (OSError, ValueError):
        head = None
    if head == b"":
        return "an empty file, 0 bytes; was it copied or downloaded whole?"
    if head and head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return HEIF_NOTE
    fmt = next((f for f, sig in SIGNATURES.items() if re.match(sig, head, re.DOTALL)), None) if head else None
    if fmt:
        what = f"that Pillow cannot decode: {detail}" if detail else "whose header Pillow cannot read"
        return f"a {fmt} file {what}; was it copied or downloaded whole?"
    return detail or "not a JPEG, PNG, WebP, BMP, TIFF or GIF file"


REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F")  # modes Image.reduce takes


def _bytes_per_pixel(mode: str) -> int:
    """Pillow keeps 8-bit images of more than one band as 4 bytes a pixel (RGB as RGBX)."""
    return 1 if mode in ("1", "L", "P") else 2 if "16" in mode else 4


def decoded_bytes(im: Image.Image, shrinking: bool) -> int:
    """What decoding `im` (as drafted) holds at its peak: its pixels, plus the copy made before it
    shrinks (a mode Image.reduce does not take) or, when it does not shrink, the RGB conversion."""
    pixels = im.width * im.height
    own = pixels * _bytes_per_pixel(im.mode)
    if not shrinking:
        return own + pixels * 4
    return own + (0 if im.mode in REDUCIBLE else pixels * (1 if im.mode == "1" else 4))


def _shrink(im: Image.Image, side: int) -> Image.Image:
    """Reduce by the largest whole factor that keeps the short side at least `side` (a box filter:
    every pixel counts, so no aliasing)."""
    factor = min(im.size) // side
    if factor < 2:
        return im
    if im.mode not in REDUCIBLE:
        info = im.info
        im = im.convert("L" if im.mode == "1" else "RGBA" if "A" in im.getbands() or "transparency" in info
                        else "I" if "16" in im.mode else "RGB")
        im.info = info
    small = im.reduce(factor)
    small.info = im.info  # EXIF orientation follows the pixels
    return small


def _detail(error: Exception, name: str) -> str:
    """The decoder's message without the repr of an in-memory file (<_io.BytesIO object at 0x...>)."""
    return re.sub(r"<[^<>]* object at 0x[0-9a-fA-F]+>", name, str(error)) or type(error).__name__


def prepare(im: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop a square: uint8 tensor (3, size, size). Laid out by
    NumPy, not by a torch kernel: serve.py prepares in each connection's thread (gradcam.overlay, why)."""
    im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)))


def check_images(paths, desc: str = "reading") -> None:
    """Decode every image once, as small as its format allows, keeping none (threads: Pillow decodes
    without the GIL): a file that is not a whole image is one line before any work that needs it."""
    _in_threads(lambda p: load_image(p, shrink_to=32), list(paths), min(8, os.cpu_count() or 1), desc)


def decode_all(paths, size: int, workers: int | None = None, desc="decode", shrink=False) -> torch.Tensor:
    """Decode every image once into a uint8 tensor (N, 3, size, size). Threads: PIL frees the GIL.

    `shrink`: decode each image as small as its format allows (load_image's `shrink_to`), for the
    users' own photos (a phone's 12 megapixels cost 48 MB a thread, and seconds, at full size). The
    dataset's photos are decoded whole, as every figure in README was made."""
    paths = list(paths)
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def work(i):
        out[i] = prepare(load_image(paths[i], shrink_to=size if shrink else None), size)

    _in_threads(work, range(len(paths)), workers or min(8, os.cpu_count() or 1), desc)
    return out


def _in_threads(fn, items, workers: int, desc: str) -> None:
    """fn over items in `workers` threads, its errors raised here; a bar for 200 items or more, on a
    terminal only (None: none in a log)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in tqdm(pool.map(fn, items), total=len(items), desc=desc, leave=False,
                      disable=True if len(items) < 200 else None):
            pass


class MSLDDataset(torch.utils.data.Dataset):
    """One fold and split of MSLD v2.0.

    Without `cache_size`, items are (transform(PIL image), label). With it, every image is decoded
    once into `self.images`, a uint8 tensor (N, 3, S, S), and items are (transform(uint8 tensor), label).
    `return_path=True` appends the file path to each item.
    """

    def __init__(self, data_root, fold: int, split: str, transform=None, *, cache_size: int | None = None,
                 return_path: bool = False, extra_dirs=(), classes=None):
        self.folds_root = usable_folds_root(data_root)
        self.classes = classes or list_classes(self.folds_root)
        added = [s for d in extra_dirs for s in augmented_samples(d, self.classes)]  # augment.py's copies
        samples = index_split(self.folds_root, fold, split, self.classes) + added
        if not samples:
            raise DataError(f"{self.folds_root}/fold{fold}/{split}: no images found")
        if split == "Train" or added:
            refuse_leaks(self.folds_root, fold, self.classes, [p for p, _ in added], extra_dirs)
        self.paths = [p for p, _ in samples]
        self.targets = torch.tensor([y for _, y in samples], dtype=torch.long)
        self.fold, self.split, self.transform, self.return_path = fold, split, transform, return_path
        self.images = decode_all(self.paths, cache_size, desc=f"fold{fold}/{split}") if cache_size else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = self.images[i] if self.images is not None else load_image(self.paths[i])
        if self.transform is not None:
            x = self.transform(x)
        y = int(self.targets[i])
        return (x, y, str(self.paths[i])) if self.return_path else (x, y)


# ----------------------------------------------------------------------------- names
NAME_RE = re.compile(r"^(?P<code>[A-Za-z]+)_(?P<patient>\d+)_(?P<image>\d+)$")


def origin_stem(path) -> str:
    """The stem of the original image an (augmented) file derives from: MKP_17_01__aug03 -> MKP_17_01."""
    return Path(path).stem.split(AUG_TAG)[0]


def patient_id(path) -> str | None:
    """'MKP_17' for MKP_17_01.jpg (or any augmented copy of it); None when the name has no patient."""
    m = NAME_RE.match(origin_stem(path))
    return f"{m['code'].upper()}_{int(m['patient'])}" if m else None


# ----------------------------------------------------------------------------- audit
def _hash_file(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _scan(folds_root: Path, aug_dirs: dict | None):
    """Every file of every fold/split: records with fold, split, class, path, content hash."""
    records = []
    for k in FOLDS:
        for s in SPLITS:
            for d in sorted((folds_root / f"fold{k}" / s).glob("*")):
                if is_class_folder(d):
                    records += [dict(fold=k, split=s, cls=d.name, path=p) for p in sorted(d.iterdir()) if p.is_file()]
    for k, d in (aug_dirs or {}).items():
        for c in sorted(Path(d).glob("*")):
            if is_class_folder(c):
                records += [dict(fold=k, split="Train", cls=c.name, path=p, aug=True)
                            for p in sorted(c.iterdir()) if p.is_file()]
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(lambda r: _hash_file(r["path"]), records))
    for r, h in zip(records, hashes):
        r["hash"] = h
    return records


def _check(name, ok, detail, items=(), fail_verdict="WARN"):
    return dict(check=name, verdict="PASS" if ok else fail_verdict, detail=detail, items=list(items)[:50],
                count=len(items))


# Near-duplicates: a difference hash (dHash: is each pixel brighter than its right neighbour, on a
# 17 x 16 greyscale thumbnail) of 256 bits survives resizing and re-compression. Calibrated on MSLD
# v2.0: copies resized to 50-90% and saved at JPEG quality 50-80 were 0-11 bits from their original
# in 49 of 50 trials (26 once), the closest two unrelated photos are 38 bits apart, and nearly
# featureless images (the synthetic set's clear skin) come within 18. Crops of more than a few
# percent move the hash further than the threshold and go unnoticed.
DHASH_SIZE = 16
NEAR_DUPLICATE_BITS = 12


def dhash(image: Image.Image, size: int = DHASH_SIZE) -> np.ndarray:
    """The difference hash of an image: size * size bits, as a boolean array."""
    a = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    return (a[:, 1:] > a[:, :-1]).ravel()


def _decode_all_once(records) -> dict:
    """Decode every distinct file once: its content hash -> ("ok", dhash bits) or ("error", message)."""
    first = {}
    for r in records:
        first.setdefault(r["hash"], r["path"])

    def decode(item):
        h, path = item
        try:
            return h, ("ok", dhash(load_image(path)))
        except DataError as e:
            return h, ("error", str(e))

    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(pool.map(decode, first.items()))


def _check_readable(records, decoded):
    items = [f"{r['path']}: {decoded[r['hash']][1].split(': ', 1)[-1]}" for r in records
             if decoded[r["hash"]][0] == "error"]
    ext = [str(r["path"]) for r in records if r["path"].suffix.lower() not in IMAGE_EXTENSIONS]
    return _check("readable images", not items, f"{len(items)} unreadable file(s), {len(ext)} non-image name(s)",
                  items + [f"{p}: not an image extension" for p in ext])


def _check_near_duplicates(records, decoded):
    """Pairs of different files whose dHashes are at most NEAR_DUPLICATE_BITS apart, listed when they
    belong to two patients or sit in two splits of a fold (a leak: the model is tested on a copy)."""
    originals = [r for r in records if not r.get("aug")]
    contents = sorted({r["hash"] for r in originals if decoded[r["hash"]][0] == "ok"})
    bits = np.array([decoded[h][1] for h in contents], dtype=np.int32).reshape(len(contents), -1)
    distance = bits @ (1 - bits).T + (1 - bits) @ bits.T  # Hamming distances, all pairs at once
    where = defaultdict(list)
    for r in originals:
        where[r["hash"]].append(r)
    items, pairs = [], []
    for i, j in zip(*np.nonzero(np.triu(distance <= NEAR_DUPLICATE_BITS, 1))):
        a, b = where[contents[i]], where[contents[j]]
        patients = sorted({patient_id(r["path"]) or r["path"].stem for r in a + b})
        split_folds = [f"fold{ra['fold']} " + "/".join(sorted((ra["split"], rb["split"]), key=SPLITS.index))
                       for ra in a for rb in b if ra["fold"] == rb["fold"] and ra["split"] != rb["split"]]
        if len(patients) < 2 and not split_folds:
            continue
        pair = dict(a=f"{a[0]['cls']}/{a[0]['path'].name}", b=f"{b[0]['cls']}/{b[0]['path'].name}",
                    distance=int(distance[i, j]), patients=patients, split_across=split_folds)
        pairs.append(pair)
        items.append(f"{pair['a']} ~ {pair['b']}: {pair['distance']} of {bits.shape[1]} bits apart"
                     + (f", patients {' and '.join(patients)}" if len(patients) > 1 else "")
                     + (f"; in two splits of {', '.join(split_folds)}" if split_folds else ""))
    check = _check("near-duplicate images", not items,
                   f"{len(items)} pair(s) of different files within {NEAR_DUPLICATE_BITS} of {bits.shape[1]} dHash "
                   "bits, across patients or splits" + (": scores on those folds are optimistic" if items else ""),
                   items)
    check["pairs"] = pairs
    return check


def _check_duplicates(records):
    items = []
    for k in FOLDS:
        by_hash = defaultdict(list)
        for r in records:
            if r["fold"] == k and not r.get("aug"):
                by_hash[r["hash"]].append(r)
        for rs in by_hash.values():
            if len(rs) > 1:
                where = ", ".join(f"{r['split']}/{r['cls']}/{r['path'].name}" for r in rs)
                kind = "in two splits" if len({r["split"] for r in rs}) > 1 else "under two names"
                items.append(f"fold{k}: same content {kind}: {where}")
    return _check("duplicate content", not items, f"{len(items)} group(s) of identical files within a fold", items)


def _check_patients(records):
    items = []
    for k in FOLDS:
        patients = defaultdict(set)
        for r in records:
            if r["fold"] == k and patient_id(r["path"]):
                patients[r["split"]].add(patient_id(r["path"]))
        for a, b in (("Train", "Valid"), ("Train", "Test"), ("Valid", "Test")):
            shared = sorted(patients[a] & patients[b])
            if shared:
                items.append(f"fold{k}: {len(shared)} patient(s) in both {a} and {b}: {', '.join(shared[:8])}"
                             + (" ..." if len(shared) > 8 else ""))
    detail = (f"{len(items)} split pair(s) share patients: scores on them are optimistic" if items
              else "no patient appears in two splits of a fold")
    return _check("patient overlap between splits", not items, detail, items)


def _check_test_folds(records):
    tests = {k: {r["hash"] for r in records if r["fold"] == k and r["split"] == "Test"} for k in FOLDS}
    everything = {r["hash"] for r in records if not r.get("aug")}
    overlaps = [f"fold{a} and fold{b} Test sets share {len(tests[a] & tests[b])} image(s)"
                for a in FOLDS for b in FOLDS if a < b and tests[a] & tests[b]]
    never = everything - set().union(*tests.values())
    items = overlaps + ([f"{len(never)} of {len(everything)} images are in no fold's Test set"] if never else [])
    detail = (f"Test sets {'overlap' if overlaps else 'are pairwise disjoint'}; "
              f"{len(never)} of {len(everything)} images never tested")
    if items:
        detail += "; the fold scores are not independent estimates over the whole dataset"
    return _check("test sets across folds", not items, detail, items)


def _check_prefixes(records):
    items = []
    for r in records:
        m = NAME_RE.match(origin_stem(r["path"]))
        code = m["code"].upper() if m else None
        expected = PREFIX_CLASS.get(code)
        if expected != r["cls"]:
            why = f"prefix {code} means {expected}" if expected else "name is not CODE_PATIENT_IMAGE with a known code"
            items.append(f"fold{r['fold']}/{r['split']}/{r['cls']}/{r['path'].name}: {why}")
    return _check("file-name prefix vs class folder", not items, f"{len(items)} mismatch(es)", items)


def leaked_copies(added: list[Path], held_out: list[tuple[Path, str]]) -> list[str]:
    """The files added to a fold's Train (augmented copies) that are one of the fold's Valid or Test
    photos, or a copy augment.py made of one (named after its origin, NAME__augNN): the network would
    train on the photos it is scored on. `held_out`: (path, split) of the fold's Valid and Test photos."""
    origins = {origin_stem(p): split for p, split in held_out if AUG_TAG not in p.stem}
    return [f"{p.name} in Train is {'a copy of ' if AUG_TAG in p.stem else ''}{origins[origin_stem(p)]} image "
            f"{origin_stem(p)}" for p in added if origin_stem(p) in origins]


def refuse_leaks(folds_root: Path, fold: int, classes, added=(), extra_dirs=()) -> None:
    """One line if a file added to fold `fold`'s Train is one of its Valid or Test photos or a copy of
    one (the audit's FAIL, which every training script refuses): `added`, the files of the augment.py
    output folders `extra_dirs`, and copies put in the Train folder itself (NAME__augNN)."""
    copied_in = [p for p, _ in index_split(folds_root, fold, "Train", classes) if AUG_TAG in p.stem]
    if not (added or copied_in):
        return
    held_out = [(p, s) for s in ("Valid", "Test") for p, _ in index_split(folds_root, fold, s, classes)]
    for where, files, advice in (
            (", ".join(map(str, extra_dirs)), added,
             f"add only fold {fold}'s Train copies, made by `python augment.py --fold {fold}`"),
            (Path(folds_root) / f"fold{fold}" / "Train", copied_in, "take them out of Train")):
        if leaks := leaked_copies(files, held_out):
            raise DataError(f"{where}: {len(leaks)} of fold {fold}'s Valid and Test photos or copies of them "
                            f"({leaks[0]}); {advice}")


def _check_augmented(records):
    items = []
    for k in FOLDS:
        held_out = [(r["path"], r["split"]) for r in records if r["fold"] == k and r["split"] != "Train"]
        added = [r["path"] for r in records if r["fold"] == k and r["split"] == "Train"
                 and (r.get("aug") or AUG_TAG in r["path"].stem)]  # an --aug-dir's files, and copies in Train
        items += [f"fold{k}: {leak}" for leak in leaked_copies(added, held_out)]
    return _check("augmented copies of held-out images", not items,
                  f"{len(items)} augmented Train file(s) derive from Valid/Test images", items, fail_verdict="FAIL")


def structure_problems(folds_root: Path, classes: list[str]) -> list[str]:
    """Problems that make the dataset unusable: a missing split folder or an empty class."""
    problems = []
    for k in FOLDS:
        for s in SPLITS:
            d = folds_root / f"fold{k}" / s
            if not d.is_dir():
                problems.append(f"{d}: missing")
                continue
            empty = [c for c in classes if not list_images(d / c)]
            if empty:
                problems.append(f"{d}: no images for class {', '.join(empty)}")
    return problems


def count_table(folds_root: Path, classes: list[str]) -> dict:
    return {f"fold{k}": {s: {c: len(list_images(folds_root / f"fold{k}" / s / c)) for c in classes}
                         for s in SPLITS} for k in FOLDS}


def audit(folds_root, aug_dirs: dict | None = None) -> dict:
    """Run every check; returns a JSON-ready report. `aug_dirs` maps fold -> augment.py output folder."""
    folds_root = Path(folds_root)
    classes = list_classes(folds_root)
    records = _scan(folds_root, aug_dirs)
    decoded = _decode_all_once(records)
    checks = [_check_readable(records, decoded), _check_duplicates(records), _check_near_duplicates(records, decoded),
              _check_patients(records), _check_test_folds(records), _check_prefixes(records),
              _check_augmented(records)]
    problems = structure_problems(folds_root, classes)  # none: every split of every fold has every class
    return dict(folds_root=str(folds_root), synthetic=is_synthetic(folds_root), classes=classes,
                counts=count_table(folds_root, classes), checks=checks, problems=problems, usable=not problems)


def format_report(report: dict) -> str:
    classes = report["classes"]
    lines = [f"dataset: {report['folds_root']}" + ("  (synthetic)" if report["synthetic"] else ""),
             "", "classes: " + ", ".join(f"{i}={c}" for i, c in enumerate(classes)), "",
             "images per class, Train/Valid/Test:"]
    head = f"{'class':<12}" + "".join(f"{f:>16}" for f in report["counts"])
    lines += [head, "-" * len(head)]
    for c in classes + ["total"]:
        cells = []
        for f in report["counts"].values():
            n = [sum(f[s].values()) if c == "total" else f[s][c] for s in SPLITS]
            cells.append(f"{'/'.join(map(str, n)):>16}")
        lines.append(f"{c:<12}" + "".join(cells))
    lines += ["", "audit:"]
    for ch in report["checks"]:
        lines.append(f"  [{ch['verdict']}] {ch['check']}: {ch['detail']}")
        lines += [f"         {it}" for it in ch["items"][:10]]
        if ch["count"] > 10:
            lines.append(f"         ... {ch['count'] - 10} more (see --report)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- synthetic data
# Skin tones from light to dark (approximate Fitzpatrick I-VI sRGB values).
SKIN_TONES = np.array([[241, 206, 180], [224, 172, 138], [198, 140, 103], [161, 102, 68],
                       [112, 72, 48], [72, 46, 34]], dtype=np.float32)
SYNTHETIC_PATIENTS = {"Chickenpox": 14, "Cowpox": 10, "HFMD": 15, "Healthy": 14, "Measles": 9, "Monkeypox": 22}
SYNTHETIC_CODES = {v: k for k, v in PREFIX_CLASS.items()}


def _skin(rng, size):
    h, w = size
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.1, 3)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    light = 1 + rng.uniform(-0.15, 0.15) * (xx - 0.5) + rng.uniform(-0.15, 0.15) * (yy - 0.5)
    img = tone[None, None] * light[..., None] + rng.normal(0, 6, (h, w, 1))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), tone


def _shade(tone, rgb, amount):
    return tuple(int(v) for v in np.clip(tone * (1 - amount) + np.array(rgb) * amount, 0, 255))


def _lesions(draw, rng, cls, tone, size):
    """Each class has its own lesion shape and pattern; counts and sizes overlap between classes."""
    h, w = size
    s = min(h, w)

    def spot(lo, hi):  # a centre, then a size as a fraction of the shorter side (draws in that order)
        x, y = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        return x, y, s * rng.uniform(lo, hi)

    if cls == "Monkeypox":  # few large umbilicated pustules: pale ring, dark centre
        for _ in range(rng.integers(2, 6)):
            x, y, r = spot(0.06, 0.11)
            draw.ellipse([x - r * 1.3, y - r * 1.3, x + r * 1.3, y + r * 1.3], fill=_shade(tone, (190, 60, 60), 0.4))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_shade(tone, (235, 225, 190), 0.7))
            draw.ellipse([x - r * 0.35, y - r * 0.35, x + r * 0.35, y + r * 0.35], fill=_shade(tone, (60, 40, 30), 0.7))
    elif cls == "Chickenpox":  # many small clear vesicles on a red halo ("dewdrop on a rose petal")
        for _ in range(rng.integers(8, 18)):
            x, y, r = spot(0.02, 0.045)
            draw.ellipse([x - r * 1.6, y - r * 1.6, x + r * 1.6, y + r * 1.6], fill=_shade(tone, (210, 50, 50), 0.45))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_shade(tone, (250, 245, 235), 0.6))
    elif cls == "Cowpox":  # one or two large dark eschars with a red rim
        for _ in range(rng.integers(1, 3)):
            x, y, r = spot(0.09, 0.16)
            rim = r * 1.25
            draw.ellipse([x - rim, y - rim, x + rim, y + rim], fill=_shade(tone, (170, 40, 40), 0.55))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_shade(tone, (25, 15, 10), 0.8))
    elif cls == "Measles":  # many flat, irregular red blotches that merge
        for _ in range(rng.integers(12, 30)):
            x, y, r = spot(0.025, 0.06)
            pts = [(x + r * rng.uniform(0.6, 1.3) * np.cos(a), y + r * rng.uniform(0.6, 1.3) * np.sin(a))
                   for a in np.linspace(0, 2 * np.pi, 7)[:-1]]
            draw.polygon(pts, fill=_shade(tone, (200, 40, 40), rng.uniform(0.35, 0.55)))
    elif cls == "HFMD":  # elongated grey oval blisters with a red halo
        for _ in range(rng.integers(4, 10)):
            x, y, a = spot(0.04, 0.08)
            b = a * rng.uniform(0.35, 0.5)
            if rng.random() < 0.5:
                a, b = b, a
            draw.ellipse([x - a * 1.4, y - b * 1.4, x + a * 1.4, y + b * 1.4], fill=_shade(tone, (200, 60, 60), 0.45))
            draw.ellipse([x - a, y - b, x + a, y + b], fill=_shade(tone, (200, 200, 195), 0.6))
    else:  # Healthy: a few freckles or hairs at most
        for _ in range(rng.integers(0, 5)):
            x, y, r = spot(0.008, 0.02)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_shade(tone, (70, 45, 30), 0.5))


def synthetic_image(cls: str, rng: np.random.Generator) -> Image.Image:
    size = (int(rng.integers(88, 136)), int(rng.integers(88, 136)))  # varied sizes, like the real set
    img, tone = _skin(rng, size)
    _lesions(ImageDraw.Draw(img), rng, cls, tone, size)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    noisy = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(3, 12), (size[0], size[1], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _synthetic_patients(rng):
    """Patients per class, each with 1-3 images, assigned round-robin to 5 groups (stratified)."""
    patients = []
    for cls, n in SYNTHETIC_PATIENTS.items():
        groups = rng.permutation(np.arange(n) % len(FOLDS))
        patients += [(cls, p + 1, int(rng.integers(1, 4)), int(g)) for p, g in zip(range(n), groups)]
    return patients


def make_synthetic(path, seed: int = 0) -> Path:
    """Write a small, deterministic dataset in the MSLD v2.0 layout (FOLDS/fold1..5/{Train,Valid,Test}).

    Patient-grouped 5-fold split: fold k tests group k, validates on group k+1, trains on the rest,
    so Test sets are disjoint and every image is tested once (unlike MSLD v2.0, see the audit).
    """
    path, written = Path(path), _synthetic_seed(path)
    if written is not None and not _has_folds(path):
        raise DataError(f"{path}: holds part of a synthetic set, not all five folds; delete it, and the same command "
                        "writes the set again")
    if written == seed:  # the setup command run again: the set it wrote is left as it is
        print(f"{path}/ holds the synthetic demo set (--seed {seed}) already: nothing to write")
        return path
    if written is not None:
        raise DataError(f"{path}: holds the synthetic set of --seed {written}; delete it to write --seed {seed}, "
                        "or choose another folder")
    check_folder(path)  # a file there, a folder we cannot write in
    if path.exists() and any(path.iterdir()):
        raise DataError(f"{path}: exists and is not an empty folder; choose another folder or delete it")
    outside_datasets(path, "--synthetic")
    rng = np.random.default_rng(seed)
    images = []
    for cls, patient, n_images, group in _synthetic_patients(rng):
        for i in range(1, n_images + 1):
            name = f"{SYNTHETIC_CODES[cls]}_{patient:02d}_{i:02d}.jpg"
            images.append((cls, name, group, synthetic_image(cls, rng)))
    with atomic_path(path, folder=True) as tmp:
        for k in FOLDS:
            test_group, valid_group = k - 1, k % len(FOLDS)
            for cls, name, group, img in images:
                split = "Test" if group == test_group else "Valid" if group == valid_group else "Train"
                out = tmp / f"fold{k}" / split / cls / name
                out.parent.mkdir(parents=True, exist_ok=True)
                img.save(out, quality=92)
        (tmp / SYNTHETIC_MARKER).write_text(f"Generated by `python getData.py --synthetic --seed {seed}`: "
                                            "not medical data.\n")
    print(f"wrote {len(images)} synthetic images x 5 folds to {path}/")
    return path


def _synthetic_seed(path) -> int | None:
    """The --seed the synthetic set at `path` was written with (its marker says); None where none is."""
    try:
        found = re.search(r"--seed (\d+)`", (Path(path) / SYNTHETIC_MARKER).read_text())
    except (OSError, UnicodeDecodeError):
        return None
    return int(found[1]) if found else None


# ----------------------------------------------------------------------------- images that are not skin
WORDS = ("patient", "report", "invoice", "total", "date", "page", "lesion", "clinic", "summary", "figure", "table",
         "method", "result", "the", "of", "and", "with", "was", "for", "data")


def not_skin_images(seed: int = 0, per_kind: int = 8, size: int = 160) -> list[tuple[str, Image.Image]]:
    """(kind, RGB image) pairs of what a lesion classifier should refuse: noise, flat colours,
    gradients, checkerboards, stripes, rendered text pages, logo-like shapes, skies, stained tissue
    slides, and skin's colours without skin (flat, and dithered pixel by pixel), `per_kind` of each,
    drawn from `seed`. The far out-of-distribution set of testing.py (with the fold's Test photos
    with their colour channels scrambled, made there)."""
    rng = np.random.default_rng(seed)
    return [(kind, paint(rng, size)) for kind, paint in NOT_SKIN.items() for _ in range(per_kind)]


def _colour(rng) -> tuple:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _noise(rng, size):
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _flat(rng, size):
    return Image.new("RGB", (size, size), _colour(rng))


def _gradient(rng, size):
    t = np.linspace(0, 1, size)[:, None, None]
    img = np.broadcast_to(np.array(_colour(rng)) * (1 - t) + np.array(_colour(rng)) * t, (size, size, 3))
    img = img.astype(np.uint8)
    return Image.fromarray(img if rng.random() < 0.5 else np.ascontiguousarray(img.transpose(1, 0, 2)))


def _checkerboard(rng, size):
    cell = int(rng.integers(4, 40))
    yy, xx = np.mgrid[0:size, 0:size] // cell
    mask = ((yy + xx) % 2).astype(bool)[..., None]
    return Image.fromarray(np.where(mask, _colour(rng), _colour(rng)).astype(np.uint8))


def _stripes(rng, size):
    width = int(rng.integers(3, 30))
    axis = np.mgrid[0:size, 0:size][int(rng.integers(2))]
    mask = ((axis // width) % 2).astype(bool)[..., None]
    return Image.fromarray(np.where(mask, _colour(rng), _colour(rng)).astype(np.uint8))


def _text_page(rng, size):
    img = Image.new("RGB", (size, size), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    for y in range(6, size - 10, 12):
        draw.text((6, y), " ".join(rng.choice(WORDS, int(rng.integers(3, 7)))), fill=(20, 20, 20))
    return img


def _shapes(rng, size):  # a logo or a diagram: flat shapes on a plain ground
    img = Image.new("RGB", (size, size), _colour(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(size / 10, size / 3)
        box = [x - r, y - r, x + r, y + r]
        [draw.ellipse, draw.rectangle][int(rng.integers(2))](box, fill=_colour(rng), outline=(0, 0, 0), width=3)
    draw.text((size / 4, size / 2), "LOGO", fill=(0, 0, 0))
    return img


def _sky(rng, size):
    t = np.linspace(0, 1, size)[:, None, None]
    img = np.array([40, 110, 220]) * (1 - t) + np.array([170, 210, 250]) * t
    img = Image.fromarray(np.broadcast_to(img, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):  # clouds
        x, y = rng.uniform(0, size, 2)
        draw.ellipse([x - 30, y - 10, x + 30, y + 10], fill=(245, 245, 250))
    return img.filter(ImageFilter.GaussianBlur(3))


def _tissue_slide(rng, size):  # haematoxylin and eosin: pink stroma, purple nuclei
    img = Image.new("RGB", (size, size), (235, 170, 200))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(80, 200))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(2, 5)
        draw.ellipse([x - r, y - r * 0.8, x + r, y + r * 0.8], fill=(90, 40, 140))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def _skin_flat(rng, size):  # skin's colour without skin: no texture, no lesion
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.integers(-10, 11, 3)  # the synthetic set's tones
    return Image.new("RGB", (size, size), tuple(int(v) for v in tone.clip(0, 255)))


def _dithered_skin(rng, size):  # two neighbouring skin tones dithered pixel by pixel: skin's colours as noise
    i = int(rng.integers(len(SKIN_TONES) - 1))
    pick = rng.random((size, size, 1)) < rng.uniform(0.3, 0.7)
    return Image.fromarray(np.where(pick, SKIN_TONES[i], SKIN_TONES[i + 1]).astype(np.uint8))


NOT_SKIN = dict(noise=_noise, flat=_flat, gradient=_gradient, checkerboard=_checkerboard, stripes=_stripes,
                text=_text_page, shapes=_shapes, sky=_sky, tissue=_tissue_slide, skin_flat=_skin_flat,
                dithered_skin=_dithered_skin)


# ----------------------------------------------------------------------------- download
def _request(url: str, headers: dict) -> urllib.request.Request:
    try:
        return urllib.request.Request(url, headers=headers)
    except ValueError as e:  # urllib's word for a URL it cannot parse ("Invalid IPv6 URL")
        raise DataError(f"{url}: not a URL that can be fetched ({e})") from None


def _continues(resp, have: int) -> bool:
    """Whether a reply to `Range: bytes=have-` holds the bytes from `have` on: a 206 whose Content-Range
    says so (RFC 9110 14.4). A 206 of another range appended to the part file would corrupt it."""
    return resp.status == 206 and re.fullmatch(rf"bytes {have}-\d+/(\d+|\*)",
                                               resp.headers.get("Content-Range", "").strip()) is not None


def _fetch(url: str, part: Path, headers: dict, retries: int = 4) -> None:
    """Download `url` to `part`, resuming with an HTTP Range request after a broken transfer."""
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        req = _request(url, {**headers, **({"Range": f"bytes={have}-"} if have else {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                if have and not _continues(resp, have):  # the range ignored (200: the whole file), or another
                    part.unlink()
                    if resp.status != 200:
                        continue  # ask again, for the whole file
                    have = 0
                # resp.length: http.client's reading of Content-Length (None when absent or not a number)
                check_space(url, resp.length or 0, part, "downloading the rest of it" if have else "downloading it")
                total = have + (resp.length or 0)
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=total or None, initial=have, unit="B", unit_scale=True, desc=part.stem,
                             disable=None) as bar:  # None: no bar where no terminal shows it (a log, a pipe)
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                if total and part.stat().st_size < total:
                    raise ConnectionError(f"transfer ended at {part.stat().st_size} of {total} bytes")
                return
        except http.client.InvalidURL as e:  # a space or control character in it
            raise DataError(f"{url}: not a URL that can be fetched ({e})") from None
        except http.client.HTTPException as e:  # a transfer cut short mid-body (IncompleteRead), a garbled reply
            error = e
        except urllib.error.HTTPError as e:
            if e.code == 416:  # range past the end: the part file is already complete
                return
            if e.code in (401, 403, 404):
                raise DataError(f"{url}: HTTP {e.code} {e.reason}; check the URL (and credentials)") from None
            error = e
        except OSError as e:  # the network's (URLError, ConnectionError, TimeoutError) or the disk's
            if e.errno == errno.ENOSPC:  # trying again makes no room
                raise WriteError(f"{part}: could not be written (disk full); free some space and run the same "
                                 "command again to resume") from None
            error = e
        if attempt < retries:
            time.sleep(min(2 ** attempt, 10) * 0.1)
    raise DataError(f"{url}: download failed after {retries + 1} tries ({error}); run the same command "
                    f"again to resume from {part}")


def safe_extract(archive: Path, target: Path, msld: bool = False,
                 not_zip: str = "delete it and download again") -> Path:
    """Extract a zip into `target` atomically: into a temp folder first, then renamed into place.

    Refused before a byte is written: members that would land outside the target (absolute paths,
    '..', symlinks), an archive larger than the free disk space, and with `msld` one without the
    five folds' splits (whatever else it holds would be extracted for nothing). `not_zip`: what to do
    about a file that is no zip (a download of ours, or the user's own file).
    """
    if target.exists():
        raise DataError(f"{target}: already exists; remove it or choose another --data-root")
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DataError(f"{archive}: not a zip file; {not_zip}") from None
    with zf:
        members = zf.infolist()
        _check_members(archive, members, target)
        if msld and (missing := _folds_missing([m.filename for m in members])):
            raise DataError(f"{archive}: not MSLD v2.0, no Train, Valid or Test folder under {', '.join(missing)} in "
                            "it; check that it is the dataset's zip")
        check_space(archive, sum(m.file_size for m in members), target)
        bad = zf.testzip()
        if bad:
            raise DataError(f"{archive}: member {bad} is corrupt; delete the file and download again")
        with atomic_path(target, folder=True) as tmp:
            zf.extractall(tmp)
    return target


def _check_members(archive: Path, members: list, target: Path) -> None:
    root = target.resolve()
    for m in members:
        is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
        if is_link or os.path.isabs(m.filename) or not (root / m.filename).resolve().is_relative_to(root):
            raise DataError(f"{archive}: member {m.filename!r} would escape the target folder; "
                            "refusing to extract this archive")


def _folds_missing(names: list[str]) -> list[str]:
    """The folds of which no member lies under foldK/<split>/ (any layout above it)."""
    found = {a for name in names for a, b in itertools.pairwise(PurePosixPath(name).parts) if b in SPLITS}
    return [f"fold{k}" for k in FOLDS if f"fold{k}" not in found]


def check_space(source, size: int, target: Path, doing: str = "extracting it", flag: str = "--data-root") -> None:
    """Refuse before writing `size` bytes under `target` when its disk has less free: a one-line
    refusal now, not a full disk (for every program on it) and a refusal later."""
    nearest = _nearest_existing(target)
    free = shutil.disk_usage(nearest).free
    if size > free:
        raise DataError(f"{source}: {doing} takes {size / 1e9:.1f} GB and {nearest} has {free / 1e9:.1f} GB "
                        f"free; free some space or choose another {flag}")


def kaggle_credentials() -> tuple[str, str]:
    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    cfg = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"
    if not (user and key) and cfg.exists():
        try:
            data = json.loads(cfg.read_text())
            user, key = data["username"], data["key"]
        except (ValueError, KeyError):
            raise DataError(f"{cfg}: expected {{\"username\": ..., \"key\": ...}}") from None
    if not (user and key):
        raise DataError("no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY or create ~/.kaggle/kaggle.json")
    return user, key


def download(url: str, data_root) -> Path:
    """Fetch a zip (or the Kaggle MSLD v2.0 dataset) and extract it under `data_root`."""
    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    headers = {"User-Agent": "mpox-lesion"}
    if url == "kaggle":
        user, key = kaggle_credentials()
        url = f"{KAGGLE_API}/datasets/download/{KAGGLE_DATASET}"
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()
        name = "MSLD v2.0"
    else:
        if not url.startswith(("http://", "https://")):
            raise DataError(f"{url}: not an http(s) URL; pass --download https://.../file.zip or --download kaggle")
        name = Path(urllib.parse.unquote(url.split("?")[0].rsplit("/", 1)[-1])).stem
        name = "dataset" if name in ("", ".", "..") or "\0" in name else name  # what a folder can be named
    part, target = data_root / f".{name}.zip.part", data_root / name
    if target.exists():  # said now, not after the whole download
        raise DataError(f"{target}: already exists (downloaded before?); remove it or choose another --data-root")
    with on_interrupt(f"the same command continues the download from {part}"):
        _fetch(url, part, headers)
    if not zipfile.is_zipfile(part):  # a web page (a sign-in or error page): resuming it would fetch nothing more
        with open(part, "rb") as f:
            head = f.read(32)
        part.unlink()
        raise DataError(f"{url}: what came is not a zip file (it starts {head!r}"
                        + (", a web page" if head.lstrip().lower().startswith((b"<!doctype", b"<html")) else "")
                        + "); check that the URL gives the .zip itself")
    safe_extract(part, target)
    part.unlink()
    return target


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = Parser(__doc__, __file__)
    p.add_argument("--data-root", help=f"folder holding MSLD v2.0 (any unzip layout; default {DEFAULTS['data_root']})")
    p.add_argument("--report", help="also write the audit as JSON to this file")
    p.add_argument("--aug-dir", action="append", default=[], metavar="K=PATH",
                   help="augment.py output folder to audit as part of fold K's Train (repeatable)")
    p.add_argument("--synthetic", nargs="?", const=True, metavar="PATH",
                   help=f"write the synthetic demo dataset to PATH (default: --data-root if given, else "
                        f"{DEFAULTS['synthetic_root']})")
    p.add_argument("--seed", type=SEED, default=DEFAULTS["seed"])
    p.add_argument("--download", metavar="URL", help="zip URL to fetch into --data-root, or 'kaggle'")
    p.add_argument("--extract", metavar="ZIP", help="a downloaded zip to extract safely into --data-root")
    return p.parse_args(argv)


def _aug_dirs(specs) -> dict:
    dirs = {}
    for spec in specs:
        k, sep, path = spec.partition("=")
        if not sep or not k.isdigit() or int(k) not in FOLDS:
            raise DataError(f"--aug-dir {spec}: expected K=PATH with K in 1..5")
        dirs[int(k)] = path
    return dirs


def run(args) -> None:
    if args.synthetic is not None:  # `--synthetic --data-root X` writes to X, where the user will look for it
        where = (args.data_root or DEFAULTS["synthetic_root"]) if args.synthetic is True else args.synthetic
        make_synthetic(where, seed=args.seed)
        return
    data_root = args.data_root or DEFAULTS["data_root"]
    if args.download:
        print(f"extracted to {download(args.download, data_root)}")
        return
    if args.extract:
        archive = Path(args.extract)
        if not archive.is_file():
            raise DataError(f"--extract {archive}: no such file")
        target = safe_extract(archive, Path(data_root) / archive.stem, msld=True,
                              not_zip="give --extract the MSLD v2.0 .zip (downloaded again, if it was cut short)")
        print(f"extracted to {target}; its folds are in {find_folds_root(target)}")
        return
    folds_root, aug_dirs = find_folds_root(data_root), _aug_dirs(args.aug_dir)
    for d in aug_dirs.values():
        augmented_samples(d, list_classes(folds_root))
    report = audit(folds_root, aug_dirs)
    print(format_report(report))
    if args.report:
        atomic_write(args.report, to_json(report, indent=2, default=str))
    if not report["usable"]:
        raise DataError(f"dataset not usable: {report['problems'][0]}")
    if failed := [c for c in report["checks"] if c["verdict"] == "FAIL"]:  # a leak: training refuses it too
        raise DataError(f"{failed[0]['check']}: {failed[0]['detail']} ({failed[0]['items'][0]}); remove them")


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
