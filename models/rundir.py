"""What a run directory holds besides checkpoints: history.csv and its curves, figures, summary tables;
and who may write there (one run at a time, never over a finished run unasked).

Figures are matplotlib `Figure` objects rendered by the Agg canvas straight to PNG bytes: no pyplot
state, so plotting is safe from any thread and needs no display.
"""
import contextlib
import csv
import functools
import io
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from getData import FOLDS, WriteError, atomic_write, check_folder, make_folder, outside_datasets

try:
    import fcntl
except ImportError:  # Windows (untested here): msvcrt's byte-range lock does what flock does
    fcntl = None
    import msvcrt

if TYPE_CHECKING:  # matplotlib is imported where a run draws its curves: it adds a third of a second to
    from matplotlib.figure import Figure  # every start (train.py, simclr.py, serve.py), --help included

ASIDE = ".replaced-by-"  # a run under --overwrite keeps the old run's files here until it writes its own
RUN_FILES = ("config.json", "best.pt", "last.pt", "encoder.pt", "history.csv", "curves.png", "loss.png", "files.txt",
             "summary.md")
TRAINING_ONLY = ("history.csv", "best.pt", "last.pt", "encoder.pt")  # of RUN_FILES, those testing.py never writes


def claim_run_dir(path, resume: bool, overwrite: bool, stack: contextlib.ExitStack, script: str,
                  folds=()) -> None:
    """Make `path` (and its `folds`' folders, for --fold all) this process's run directory until
    `stack` closes: an exclusive lock (a second run writing there is refused, not left to overwrite
    this one's files), and no finished run replaced unless asked: --resume continues it, --overwrite
    replaces it. A run that stops before writing anything (a refused --model or --init) leaves
    everything as it found it: no new folder, and under --overwrite the old run whole."""
    outside_datasets(path)
    asides = []
    try:
        for folder in dict.fromkeys(map(Path, [path, *folds])):
            if aside := _claim_one(folder, resume, overwrite, stack, script):
                asides.append(aside)
    except BaseException:  # a fold's folder refused after another's files were set aside: put them back
        _replace_or_restore(Path(path), asides, None)
        raise
    if asides:  # runs before the folders' own clean-up (ExitStack unwinds in reverse)
        stack.callback(_replace_or_restore, Path(path), asides, _listing(Path(path)))


def _claim_one(path: Path, resume: bool, overwrite: bool, stack: contextlib.ExitStack, script: str) -> Path | None:
    """Lock one folder; under --overwrite move its run's files aside (the folder they went to)."""
    made = [q for q in [path, *path.parents] if not os.path.lexists(q)]  # deepest first
    path = make_folder(path)
    handle = stack.enter_context(open(path / ".lock", "a+"))
    if not _try_lock(handle):
        handle.seek(0)
        raise WriteError(f"{path}: in use by another run (process {handle.read().strip() or '?'}); wait for it to "
                         "end or choose another --out") from None
    stack.callback(_remove_if_unused, path, made)  # runs before the lock is released
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    for stale in sorted(path.glob(f"{ASIDE}*")):  # the lock is ours: whoever set these aside is gone (kill -9)
        print(f"note: {stale} holds the files of a run that an --overwrite killed outright had set aside; move "
              f"them back into {path}, or delete that folder")
    found = [name for name in RUN_FILES if (path / name).is_file()]
    if found and not resume and not overwrite:
        raise WriteError(f"{path}: holds a run already ({', '.join(found)}); continue it with `python {script} "
                         "--resume` and the same arguments, or replace it with --overwrite")
    if not (found and overwrite):
        return None
    aside = Path(tempfile.mkdtemp(prefix=f"{ASIDE}{os.getpid()}-", dir=path))
    for name in found:
        (path / name).rename(aside / name)
    return aside


def _try_lock(handle) -> bool:
    """An exclusive lock on the open file, released when it closes or the process ends; False while
    another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # one byte far from the start, where the holder's process id stays readable
            os.lseek(handle.fileno(), 1 << 20, os.SEEK_SET)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return True
    except BlockingIOError:
        return False
    except OSError:  # msvcrt: locked elsewhere
        if fcntl is not None:
            raise
        return False


def _listing(top: Path) -> set:
    """Every file under `top` with its size and time, but lock files and the old run's files set aside."""
    files = set()
    for p in top.rglob("*"):
        if p.is_file() and p.name != ".lock" and not any(part.startswith(ASIDE) for part in p.relative_to(top).parts):
            stat = p.stat()
            files.add((str(p), stat.st_size, stat.st_mtime_ns))
    return files


def _replace_or_restore(top: Path, asides: list[Path], before: set | None) -> None:
    """--overwrite, when the run ends: once it has written anything under `top` (the listing differs
    from `before`), the old run's files go; if it stopped before (refused, interrupted at once), they
    are put back where they were."""
    wrote = before is not None and _listing(top) != before
    for aside in asides:
        if not wrote:
            for f in aside.iterdir():
                f.rename(aside.parent / f.name)
        shutil.rmtree(aside, ignore_errors=True)


def output_folder(path, default_name: str, ours: re.Pattern) -> Path:
    """Where testing.py or gradcam.py writes (--out): a folder that can be written, outside every
    dataset, not a training run's own directory (or one of its folds), whose config.json and
    summary.md it would replace, and holding nothing but names `ours` matches (what the script writes:
    its earlier outputs, which getData.atomic_path replaces whole; a folder of the user's own files
    is refused, not emptied)."""
    path = outside_datasets(check_folder(path))
    if any((folder / name).is_file() for folder in (path, *(path / f"fold{k}" for k in FOLDS))
           for name in TRAINING_ONLY):
        raise WriteError(f"--out {path}: a training run's folder, whose files these outputs would replace; choose "
                         f"another, e.g. {path / default_name} (the default)")
    theirs = sorted(p.name for p in path.iterdir() if p.name not in JUNK and not ours.fullmatch(p.name)) \
        if path.is_dir() else []
    if theirs:
        more = f" and {len(theirs) - 1} more" if len(theirs) > 1 else ""
        raise WriteError(f"--out {path}: holds {theirs[0]}{more}, which this script does not write, and its outputs "
                         "replace the folder's contents; choose a new or empty folder")
    return path


JUNK = (".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints")  # what a file browser or Jupyter leaves


def _remove_if_unused(path: Path, made: list[Path]) -> None:
    """Undo claim_run_dir when the run wrote nothing: its lock file, and the folders it made."""
    try:
        if [p.name for p in path.iterdir()] != [".lock"]:
            return
        (path / ".lock").unlink()
        for folder in made:
            folder.rmdir()
    except OSError:  # a folder another process has written into since: it stays
        pass


class SaveClock:
    """When to write last.pt and the history (--save-every SECONDS): at most that often, and always at
    the end, so a killed run loses at most that much work and a fast epoch loop is not held up by
    a checkpoint write per epoch. 0 writes every epoch."""

    def __init__(self, every: float):
        self.every, self.last = every, time.perf_counter()

    def due(self, final: bool) -> bool:
        if final or time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            return True
        return False


def drawable(text: str) -> str:
    """`text` (a class or file name) as a figure can show it: a `$` is a dollar, not the start of
    matplotlib's maths (a photo named `a$\\frac$.jpg` stopped gradcam.py with a parser traceback), and
    a character the figures' font lacks (a class folder named in Chinese, an emoji) is written as its
    code point, [U+6C34], so two such classes stay two labels, not two rows of the same empty boxes."""
    have = _font_chars()
    return "".join("\\$" if c == "$" else c if ord(c) in have or not c.isprintable() else f"[U+{ord(c):04X}]"
                   for c in text)


@functools.cache
def _font_chars() -> frozenset[int]:
    """The characters the default font of matplotlib's figures (DejaVu Sans unless configured) has."""
    from matplotlib import font_manager, ft2font
    return frozenset(ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def png_bytes(fig: "Figure", dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: "Figure", path, dpi: int = 100) -> None:
    atomic_write(path, png_bytes(fig, dpi))


def write_history(history: list[dict], fields: list[str], out: Path, panels: list[tuple[str, list[str]]],
                  name: str = "curves.png") -> None:
    """history.csv (one row per epoch) and a figure with one panel per (title, columns)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(Path(out) / "history.csv", buf.getvalue())
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.5 * len(panels), 4))
    for ax, (title, keys) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        for key in keys:
            points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
            if points:  # train_loss -> "train", valid_bal_acc -> "valid balanced"
                label = key.rsplit("_", 1)[0].replace("_", " ").replace("bal", "balanced")
                ax.plot(*zip(*points), marker="o" if len(points) < len(history) else None,
                        label=label if len(keys) > 1 else None)
        ax.set(xlabel="epoch", title=title)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    save_figure(fig, Path(out) / name)


def mean_std(values, digits: int = 4) -> str:
    """'mean ± std' of numbers over runs (sample std, ddof=1; 0 for a single run)."""
    values = np.asarray(values, float)
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.{digits}f}"


def mean_std_table(rows: list[dict], keys, label: str = "fold") -> str:
    """Markdown table: one row per run plus mean ± std (sample std, ddof=1) over runs. A run without
    a figure (a confidence gate that keeps no image has no accuracy) shows '—', and the mean is over
    the runs that have it, said as 'k of n' (the column used to vanish for every run)."""
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    lines = [f"| {label} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r[label]} | " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    means = []
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        means.append(mean_std(values) + (f" ({len(values)} of {len(rows)})" if len(values) < len(rows) else ""))
    lines.append("| mean ± std | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value}" if isinstance(value, int) else f"{value:.4f}"  # an epoch is not 2.0000
