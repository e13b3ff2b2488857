"""A markdown report's last step, shared by the bench scripts: print it, and write it where asked."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def write_lines(lines: Sequence[str], out: Path | None) -> int:
    """Print a report's lines and write them to `out` if given; 0 (a script's exit status)."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out:
        out.write_text(text)
    return 0


def made_with(script: str) -> str:
    """The report's command line, indented as a markdown code block: `script` with this run's arguments."""
    return "    .venv/bin/python " + " ".join([script, *sys.argv[1:]])
