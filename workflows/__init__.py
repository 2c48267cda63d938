"""surveypipe: workflows."""
from __future__ import annotations

import sys
from pathlib import Path


def surveypipe_command(*args: object) -> list[str]:
    """argv for the ``surveypipe`` CLI of this environment (the venv's script beside this Python,
    else the one on PATH), for workflows that run the pipeline in separate processes."""
    exe = Path(sys.executable).with_name("surveypipe")
    return [str(exe) if exe.exists() else "surveypipe", *map(str, args)]
