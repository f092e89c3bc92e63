"""A newcomer's first contact, scripted: the README's two-terminal example, run as written, in a
fresh clone, against the sandbox it starts. Each command must end with the exit code its comment
promises, and none may print a traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def block_after(marker: str, readme: str) -> list[str]:
    """The command lines of the ```sh block that follows ``marker``."""
    after = readme.split(f"<!-- newcomer: {marker} -->", 1)[1]
    body = after.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in body.splitlines() if line.strip() and not line.startswith("#")]


def fresh_clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    if (ROOT / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)
    else:  # an unpacked archive: a copy of what a clone would hold
        shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".venv*", "out", ".*cache"))
    return clone


@pytest.mark.slow
def test_the_readme_first_contact_works_as_written(tmp_path: Path) -> None:
    """Terminal 1 starts the sandbox and prints the export line; terminal 2's commands, pasted
    after it, each exit as their comment says."""
    readme = (ROOT / "README.md").read_text()
    [activate, serve] = block_after("terminal 1", readme)
    [again, *commands] = block_after("terminal 2", readme)
    assert activate.split("#")[0].strip() == again == ". .venv/bin/activate"
    clone = fresh_clone(tmp_path)
    # What make demo leaves in the clone: this virtualenv, which its activate script names.
    (clone / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {**os.environ, "PATH": os.pathsep.join(_without(BIN, os.environ["PATH"]))}
    env.pop("ALLO_API_KEY", None)
    env.pop("VIRTUAL_ENV", None)
    sandbox = subprocess.Popen(
        ["bash", "-c", f"{again} && exec {serve.split('#')[0]}"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        export = None
        deadline = time.monotonic() + 30
        assert sandbox.stdout is not None
        while export is None and time.monotonic() < deadline:
            line = sandbox.stdout.readline()
            if not line:
                break
            if line.strip().startswith("export "):
                export = line.strip()
        assert export is not None, "the sandbox printed no export line"
        for name, value in re.findall(r"(\w+)=(\S+)", export):
            env[name] = value
        for command in commands:
            promised = re.search(r"# exits (\d+)", command)
            assert promised, f"the README gives no exit code for: {command}"
            done = subprocess.run(
                ["bash", "-c", f"{again} && {command.split('#')[0]}"],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == int(promised.group(1)), (command, done.stderr[-1500:])
            assert "Traceback" not in done.stderr, command
    finally:
        sandbox.terminate()
        sandbox.communicate(timeout=30)


def _without(folder: Path, path: str) -> list[str]:
    """The folders of ``path`` but ``folder``: allo-batch is found only once activated."""
    return [entry for entry in path.split(os.pathsep) if entry and Path(entry) != folder]
