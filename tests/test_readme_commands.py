"""The README's commands, as a new user runs them: every ```bash block marked `<!-- commands: cpu -->` is run
in README order, twice in a row, in a fresh copy of the tree (no runs/, no .venv), and each command must
exit 0. Blocks marked `<!-- commands: skip: REASON -->` (GPUs, downloads, the user's own files) are not
run; a command inside a cpu block is left out by `skip "PREFIX": REASON` in its marker.

The commands run with the environment running this test: its venv's bin/ first on PATH, and `make`
pointed at that venv (`VENV=`, its install stamp taken as up to date) so nothing is installed.
`EMU_MC_VENV` names another venv.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest

from tests.torchrun_utils import REPO_ROOT, child_env

README = REPO_ROOT / "README.md"
MARKER = re.compile(r"^<!-- commands: (?P<kind>cpu|skip)(?P<rest>[^\n]*?) -->\n```bash\n(?P<body>.*?)^```", re.S | re.M)
COMMAND_SKIP = re.compile(r'skip "(?P<prefix>[^"]+)": (?P<reason>[^;]+)')


@dataclass
class Block:
    line: int  # of the marker, 1-based
    kind: str  # cpu | skip
    reason: str  # why a skip block is not run
    commands: List[str]
    skipped: List[Tuple[str, str]]  # (command, reason) left out of a cpu block


def shell_commands(body: str) -> List[str]:
    """One entry per command of a bash block: `\\` continuations joined, comment-only lines dropped."""
    commands, pending = [], ""
    for line in body.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        commands.append((pending + line).strip())
        pending = ""
    assert not pending, f"a command ends in a line continuation: {pending!r}"
    return commands


def readme_blocks(text: str) -> List[Block]:
    blocks = []
    for m in MARKER.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        commands, rest = shell_commands(m["body"]), m["rest"]
        if m["kind"] == "skip":
            reason = rest.lstrip(":").strip()
            assert reason, f"README.md:{line}: a skipped block must say why"
            blocks.append(Block(line, "skip", reason, commands, []))
            continue
        commands = [shlex.join(shlex.split(c, comments=True)) for c in commands]  # trailing comments dropped
        prefixes = {s["prefix"]: s["reason"].strip() for s in COMMAND_SKIP.finditer(rest)}
        skipped = [(c, r) for p, r in prefixes.items() for c in commands if c.startswith(p)]
        assert len(skipped) == len(prefixes), f"README.md:{line}: a skip prefix matches no command: {prefixes}"
        run = [c for c in commands if c not in {c for c, _ in skipped}]
        blocks.append(Block(line, "cpu", "", run, skipped))
    return blocks


README_TEXT = README.read_text()
BLOCKS = readme_blocks(README_TEXT)


def test_every_bash_block_of_the_readme_says_whether_it_runs_on_a_cpu():
    marked = {b.line + 1 for b in BLOCKS}  # the fence follows its marker
    fences = [i + 1 for i, line in enumerate(README_TEXT.splitlines()) if line.startswith("```bash")]
    unmarked = [f"README.md:{n}" for n in fences if n not in marked]
    assert not unmarked, (f"mark these blocks `<!-- commands: cpu -->` (run by this test) or "
                          f"`<!-- commands: skip: REASON -->`: {unmarked}")
    assert sum(len(b.commands) for b in BLOCKS if b.kind == "cpu") >= 5


def fresh_tree(dest: Path) -> Path:
    """What a clone of this tree holds (tracked files and new files git does not ignore), with their
    working-tree contents: no runs/, .venv or build outputs."""
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                               capture_output=True, check=True).stdout.decode().split("\0")
    except (FileNotFoundError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in filter(None, files):
        src = REPO_ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def command_environment(venv: Path) -> dict:
    return child_env(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv))


def with_venv(command: str, venv: Path) -> str:
    """`make TARGET` in the test's venv: VENV= points at it, and `-o` takes its install stamp as up to date
    (the copy's pyproject.toml is newer than the stamp; make would otherwise reinstall into it)."""
    if command.startswith("make "):
        return f"{command} VENV={venv} -o {venv / '.installed'}"
    return command


@pytest.mark.slow
def test_readme_cpu_commands_run_twice_in_order_in_a_fresh_tree(tmp_path):
    venv = Path(os.environ.get("EMU_MC_VENV", sys.prefix))
    if not (venv / "bin" / "torchrun").exists():
        pytest.skip(f"{venv} is not a venv with torchrun (set EMU_MC_VENV)")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    tree = fresh_tree(tmp_path / "emu_mc")
    env = {**command_environment(venv), "PYTHONPATH": str(tree)}
    commands = [c for b in BLOCKS if b.kind == "cpu" for c in b.commands]
    timings = []
    for attempt in (1, 2):
        for command in commands:
            start = time.monotonic()
            proc = subprocess.run(["bash", "-c", with_venv(command, venv)], cwd=tree, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=300)
            timings.append(f"{time.monotonic() - start:5.1f} s  run {attempt}: {command}")
            assert proc.returncode == 0, (f"run {attempt} of the README's commands: `{command}` exited "
                                          f"{proc.returncode}:\n{proc.stdout[-4000:]}")
    print("\n".join(timings))
