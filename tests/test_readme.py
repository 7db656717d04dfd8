"""The README's quick start runs as written and prints what its comments say; its set-up commands are the two.

The Python blocks under "## Quick start" are run, in order, as one script in a fresh interpreter
(the same as pasting them into ``python``). Every ``print(...)`` line of them carries a comment that
begins with what it prints; each printed line must be that comment's beginning, so a README whose
code or stated values drift from the library fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP_COMMANDS = [
    "bash scripts/setup.sh && .venv/bin/rotorquant bench",
    "bash scripts/setup.sh && bash scripts/test.sh",
]


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a Markdown document."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\s*\n(.*?)^```\s*$", text, re.M | re.S)


def _stated_outputs(code: str) -> list[str]:
    """The comment of every ``print(...)`` line, in order: it begins with what the line prints."""
    stated = []
    for line in code.splitlines():
        if re.match(r"\s*print\(", line):
            assert "#" in line, f"README quick start: a print without a comment stating its output: {line!r}"
            stated.append(line.split("#", 1)[1].strip())
    return stated


def test_quick_start_runs_and_prints_what_the_readme_states() -> None:
    code = "\n".join(_blocks(_section(README.read_text(encoding="utf-8"), "Quick start"), "python"))
    stated = _stated_outputs(code)
    assert stated, "the README quick start prints nothing to check"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"the README quick start fails:\n{proc.stderr[-4000:]}"
    printed = proc.stdout.splitlines()
    assert len(printed) == len(stated), (
        f"the quick start printed {len(printed)} lines for {len(stated)} print calls:\n{proc.stdout}")
    for out, comment in zip(printed, stated):
        out = out.strip()
        assert out and (comment == out or comment.startswith(out + " ")), (
            f"the README says a line prints {comment!r}, but it printed {out!r}")


def test_readme_keeps_exactly_the_two_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    commands = [block.strip() for block in _blocks(text, "bash")]
    assert commands == SETUP_COMMANDS, f"README shell blocks: expected exactly {SETUP_COMMANDS}, got {commands}"
    for script in ("scripts/setup.sh", "scripts/test.sh"):
        assert (ROOT / script).is_file(), f"the README runs {script}, which does not exist"
