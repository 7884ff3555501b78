"""The house rules: which script may import which, README's table of what each one brings along, and
what a script's start imports."""
import ast
import re
import subprocess
import sys

from conftest import REPO

COMMANDS = ["train", "testing", "simclr", "gradcam", "serve"]
SHARED = ["getData", "augment", "models"]
ALLOWED = {("serve", "gradcam")}  # serve.py draws Grad-CAM with gradcam.GradCAM


def repo_imports(path) -> tuple[set[str], list[int]]:
    """The repository modules a file imports at its top level, and the lines of any imported elsewhere."""
    tree = ast.parse(path.read_text())
    names = {f.stem for f in REPO.glob("*.py")} | {"models"}
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found = {m.split(".")[0] for m in mods} & names
            if found and node in tree.body:
                top |= found
            elif found:
                nested.append(node.lineno)
    return top - {path.stem}, nested


def files_of(module: str) -> list:
    return sorted((REPO / "models").glob("*.py")) if module == "models" else [REPO / f"{module}.py"]


def closure(script: str) -> list:
    """The files a copy of `script` needs: itself and every repository file it imports, transitively."""
    seen, todo = [], [script]
    while todo:
        module = todo.pop()
        for f in files_of(module):
            if f not in seen:
                seen.append(f)
                todo += sorted(repo_imports(f)[0] - set(todo))
    return seen


def test_no_command_script_imports_another_and_imports_sit_at_the_top():
    for name in COMMANDS + SHARED:
        for f in files_of(name):
            top, nested = repo_imports(f)
            assert not nested, f"{f.name}: repository imports inside functions at lines {nested}"
            if name in COMMANDS:
                others = {m for m in top if m in COMMANDS and (name, m) not in ALLOWED}
                assert not others, f"{f.name} imports the command script(s) {others}"
            else:
                assert not top & set(COMMANDS), f"{f.name}: a shared module imports a command script"


def test_the_shared_modules_form_one_chain():
    assert repo_imports(REPO / "getData.py")[0] == set()
    assert {m for f in files_of("models") for m in repo_imports(f)[0]} == {"getData", "models"}
    assert repo_imports(REPO / "augment.py")[0] == {"getData", "models"}


def test_readme_script_table_says_what_each_script_brings():
    """README's table: each script, what it imports from the repo, and the lines a copy carries."""
    table = {}
    row_re = r"^\| `(\w+)(?:\.py|/)` \|[^|]*\| ([^|]*) \| ([\d,]+) \|$"
    for row in re.findall(row_re, (REPO / "README.md").read_text(), re.M):
        table[row[0]] = (row[1].strip(), int(row[2].replace(",", "")))
    assert set(table) == set(COMMANDS + SHARED), sorted(table)
    for name, (imports, lines) in table.items():
        direct = sorted(set().union(*(repo_imports(f)[0] for f in files_of(name))) - {name})
        assert imports == (", ".join(direct) or "—"), (name, imports, direct)
        counted = sum(len(f.read_text().splitlines()) for f in closure(name))
        assert lines == counted, f"README says {name} brings {lines} lines; it brings {counted}"


def test_scripts_start_without_torchvision_or_matplotlib():
    """Importing torchvision adds nearly 2 s to a start (its ops pull in torch._dynamo), paid by every
    `--help`, LeNet run and test subprocess when it sat at the top: it is imported only where a
    torchvision network or per-image transform is made. matplotlib (half a second) likewise, where a
    figure is drawn, for the scripts that do not always draw. Choosing the runtime leaves the default
    (non-deterministic) numerics alone without asking torch to set them: the call imports
    torch._inductor and torch._dynamo (2.5 s more for every testing.py, gradcam.py and serve.py start;
    training pays it anyway, at its first optimizer). A fresh interpreter proves it."""
    code = ("import sys, getData, augment, train, simclr, models\n"
            "print('matplotlib' in sys.modules)\n"
            "import testing, gradcam, serve\n"
            "models.build_model('lenet', 6)\n"
            "models.select_runtime('cpu')\n"
            "print(sorted(m for m in sys.modules if m in ('torch', 'torch._dynamo') or m.startswith('torchvision')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["False", "['torch']"], proc.stdout + proc.stderr[-2000:]


WINDOWS_LOCK = """
import contextlib, os, sys, types
import torch  # which, on Linux, imports fcntl itself
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` fails
held = {}  # (file, byte) -> fd, across the file's handles, as Windows' byte-range locks are
def locking(fd, mode, nbytes):
    key = (os.stat(fd).st_ino, os.lseek(fd, 0, os.SEEK_CUR))
    if held.setdefault(key, fd) != fd:
        raise PermissionError(13, "Permission denied")
sys.modules["msvcrt"] = types.SimpleNamespace(LK_NBLCK=2, locking=locking)
import train, serve, testing, gradcam, simclr, augment
from models import claim_run_dir
with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
    claim_run_dir(sys.argv[1], False, False, first, "train.py")
    try:
        claim_run_dir(sys.argv[1], False, False, second, "train.py")
    except Exception as e:
        print(e)
"""


def test_every_script_imports_and_locks_its_run_directory_where_fcntl_is_missing(tmp_path):
    """On Windows there is no fcntl: every script would fail at import. There the run directory's lock
    is msvcrt's, on a byte away from the process id, which a second run must still read. Windows
    itself is not at hand: msvcrt is stood in for, with its locks' semantics (one holder per byte)."""
    proc = subprocess.run([sys.executable, "-c", WINDOWS_LOCK, tmp_path / "run"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'run'))}: in use by another run \(process \d+\); .*\n",
                        proc.stdout), proc.stdout


def test_every_mutant_still_matches_the_code_it_breaks():
    """tests/mutants.py breaks the code in named places to show the tests catch it: a place edited
    since is named here (run `python tests/mutants.py --only N` for the mutants of a changed file)."""
    from mutants import MUTANTS
    stale = [(i, file, code[:60]) for i, (file, code, bug, _, tests) in enumerate(MUTANTS)
             if (REPO / file).read_text().count(code) != 1 or bug == code
             or not all((REPO / "tests" / t).is_file() for t in tests.split())]
    assert not stale, f"update these mutants in tests/mutants.py: {stale}"
