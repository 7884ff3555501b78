"""Shared fixtures: one synthetic dataset per session, the real data when it sits beside the checkout."""
import concurrent.futures
import contextlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests import the top-level scripts as modules

from getData import find_folds_root, make_synthetic  # noqa: E402

REAL_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped on machines without one)")
    config.addinivalue_line("markers", "figures: draws its figures (the others get a blank PNG of the same size)")
    # torch 2.11 warns about its own torch.utils.mkldnn when torch.compile first imports it (2.14 does
    # not): not ours to fix, and a warning from this project's code should stand alone in the summary.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_addoption(parser):
    parser.addoption("--draw-figures", action="store_true",
                     help="every test draws its figures (by default only those marked `figures` do)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def figures_built_not_drawn(request, monkeypatch):
    """Every figure is built, artist by artist, but only the tests marked `figures` draw it; the others
    get a blank PNG of the figure's size. Laying out and drawing costs matplotlib 0.1 to 0.3 s a figure
    (text, mostly): about 400 figures, half a minute of the suite, for tests that read numbers and files.
    A bad argument to a plot still raises as the figure is built; what only drawing shows (a title
    matplotlib cannot lay out, what is drawn) is for the tests marked `figures`, which between them
    draw every kind of figure the scripts write and check that it is drawn (`drawn`); `pytest
    --draw-figures` draws them all. Session fixtures (the trained runs' curves.png) are set up before
    this, and draw theirs."""
    if request.node.get_closest_marker("figures") or request.config.getoption("draw_figures"):
        return
    from matplotlib.figure import Figure

    def blank(fig, file, dpi=100, **kwargs):
        Image.new("1", tuple((fig.get_size_inches() * dpi).round().astype(int)), 1).save(file, "PNG")  # 3 ms
    monkeypatch.setattr(Figure, "tight_layout", lambda fig, *args, **kwargs: None)
    monkeypatch.setattr(Figure, "savefig", blank)


def drawn(png: Path) -> bool:
    """Whether a figure was drawn: lines, text and colours, not one blank page."""
    return len(Image.open(png).convert("L").getcolors()) > 10  # grey levels


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """The synthetic MSLD-layout dataset, generated once (seed 0)."""
    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic", seed=0)


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real MSLD v2.0 folds root; the test is skipped on a clone without ../shared/data."""
    if not REAL_DATA.is_dir():
        pytest.skip("real MSLD v2.0 data not present (../shared/data)")
    return find_folds_root(REAL_DATA)


def start_as_from_a_terminal(script, *args) -> subprocess.Popen:
    """A script (or `-m MODULE`) started in a process group of its own with Ctrl-C not ignored, as from a terminal
    (anything started with `nohup ... &`, this suite perhaps, ignores it). os.killpg(proc.pid,
    signal.SIGINT) is then a terminal's Ctrl-C: it reaches the script and every process it started."""
    interactive = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "sys.argv = sys.argv[1:]; "  # "-m MODULE ..." runs a module, as python -m does
                   "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True) if sys.argv[0] == '-m' "
                   "else runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", interactive, script, *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def start_in_the_background(script, *args) -> subprocess.Popen:
    """A script started as `nohup python script ... &` starts it: Ctrl-C ignored, a process group of its own."""
    return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


@contextlib.contextmanager
def ctrl_c_as_from_a_terminal():
    """Ctrl-C in this process as a terminal leaves it (Python's default handler), for a test's block: a
    suite started with `nohup ... &` ignores it, and the scripts leave an ignored Ctrl-C ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def signal_in_a_finalizer(sig) -> None:
    """`sig` to this process while a finalizer (`__del__`) runs: Python runs the signal's handler there
    and drops what it raises, as it did inside tqdm's."""
    class Finalizer:
        def __del__(self):
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs here, and its exception goes nowhere
                pass
    Finalizer()


def interrupt_when(proc: subprocess.Popen, ready, whole_group: bool, sig=signal.SIGINT, within=10) -> list[str]:
    """Ctrl-C (or `sig`) to `proc` (from start_as_from_a_terminal) once ready() holds: to its whole process
    group as a terminal sends it, or to `proc` alone as `kill -INT` does. Returns its stderr's lines, bars
    left out, once it and every process it started have ended (those within `within` seconds of its
    end); a failing test leaves none running."""
    try:
        deadline = time.monotonic() + 120
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        (os.killpg if whole_group else os.kill)(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
        assert group_gone(proc.pid, within), "a process it started outlived it"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]


def at_once(fn, cases) -> list:
    """fn(case) for every case at the same time, each in a thread, results in order: for cases that wait
    on processes of their own, mostly importing torch, one after the other would leave a core idle."""
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(fn, cases))


def group_gone(group: int, within: float) -> bool:
    """Whether every process of the process group has ended within `within` seconds. An ended process
    its parent has not reaped (a zombie) runs nothing and counts as ended: one whose parent has left
    waits for PID 1 to reap it, which in a container may take seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _running_in(group):
            return True
        time.sleep(0.05)
    return False


def _running_in(group: int) -> bool:
    """Whether a process of the process group still runs (is not a zombie); where there is no /proc,
    whether the group has a process at all."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)": state, ppid, pgrp
        except (OSError, IndexError):  # ended meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


@contextlib.contextmanager
def serving(srv):
    """srv (a socketserver) answering from a thread of its own for the block, then shut down and closed,
    and its Predictor too (serve.py). It looks for the shutdown every 10 ms, not socketserver's 0.5 s:
    each server of the suite took up to half a second to stop, 10 s in all."""
    threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        if getattr(srv, "predictor", None):  # its thread left running slowed every later test (test_serve.py)
            srv.predictor.close()


def run_cli(script, *args, cwd=None):
    """A script's command line run through its main() in this process: its exit status and what it
    printed, as a CompletedProcess. Seconds faster than a new interpreter importing torch; the process
    boundary itself is covered by the tests that need it (fresh clone, torchrun, a terminal)."""
    module = importlib.import_module(Path(script).stem)
    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main([str(a) for a in args])
            except SystemExit as e:  # argparse's own errors
                code = e.code
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, *fragments):
    """A user mistake: non-zero exit, one 'error:' line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def killed_on_call(monkeypatch, module, name: str, n: int = 3):
    """Make module.name raise KeyboardInterrupt on its n-th call (a run killed mid-way); returns a
    function that puts the real one back."""
    real, calls = getattr(module, name), {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(module, name, dies)
    return lambda: monkeypatch.setattr(module, name, real)


def strict_json(text: str):
    """Parse as a strict reader does (jq, JavaScript's JSON.parse): the tokens NaN and Infinity refused."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def train_args(data, out, *extra):
    return ["--data-root", str(data), "--out", str(out), "--device", "cpu", *map(str, extra)]


@pytest.fixture(scope="session")
def trained(synthetic, tmp_path_factory) -> Path:
    """A LeNet trained on synthetic fold 1 long enough to be clearly better than chance."""
    import train
    out = tmp_path_factory.mktemp("runs") / "lenet-fold1"
    assert train.main(train_args(synthetic, out, "--epochs", 40, "--batch-size", 16)) == 0
    return out


@pytest.fixture(scope="session")
def trained_resnet(synthetic, tmp_path_factory) -> Path:
    """A ResNet-18 at 64 px on synthetic fold 1: features a distance can be measured in (LeNet's are
    too poor: noise lands nearer its Train images than its own Test images do)."""
    import train
    out = tmp_path_factory.mktemp("runs") / "resnet18-fold1"
    assert train.main(train_args(synthetic, out, "--model", "resnet18", "--input-size", 64, "--epochs", 15,
                                 "--batch-size", 16, "--lr", 1e-3)) == 0
    return out


@pytest.fixture(scope="session")
def trained_all(synthetic, tmp_path_factory) -> Path:
    """A quick (2-epoch) LeNet --fold all run: for the plumbing of 5-fold outputs, not for accuracy."""
    import train
    out = tmp_path_factory.mktemp("runs") / "lenet-all"
    assert train.main(train_args(synthetic, out, "--fold", "all", "--epochs", 2)) == 0
    return out


@pytest.fixture
def small_disk(tmp_path, request):
    """A 400 KB file system of its own (tmpfs; needs root, as CI and this project's machines have);
    another size in KB through `@pytest.mark.parametrize("small_disk", [KB], indirect=True)`."""
    mount = tmp_path / "disk"
    mount.mkdir()
    size = getattr(request, "param", 400)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k", f"tmpfs-{uuid.uuid4().hex[:8]}", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
