"""Shared by the benchmark scripts: where a figure came from, and appending results."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out + ("+dirty" if dirty else "")


def machine() -> str:
    """One line about the machine: CPU count, memory, and the GPU when torch sees one."""
    parts = [f"{platform.machine()}", f"{os.cpu_count()} CPUs"]
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        parts.append(f"{pages / 2**30:.0f} GiB RAM")
    except (ValueError, OSError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            mem = torch.cuda.get_device_properties(0).total_memory / 2**30
            parts.append(f"GPU {name} ({mem:.0f} GiB)")
        else:
            parts.append("no GPU")
        parts.append(f"torch {torch.__version__}")
    except ImportError:
        parts.append("no torch")
    parts.append(f"Python {platform.python_version()}")
    try:
        one, five, _ = os.getloadavg()
        parts.append(f"load average {one:.1f} / {five:.1f} (1 / 5 min, when printed)")
    except OSError:
        pass
    return ", ".join(parts)


def header(title: str) -> str:
    """The provenance lines every benchmark prints first."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = " ".join([Path(sys.executable).name, *sys.argv])
    return (
        f"## {title}\n\n- when: {now}\n- command: `{cmd}`\n"
        f"- commit: {commit()}\n- machine: {machine()}\n"
    )


def record(section: str, *, enabled: bool) -> None:
    """Print a results section and, when enabled, append it to bench/RESULTS.md."""
    print(section)
    if enabled:
        with RESULTS.open("a") as f:
            f.write("\n" + section.rstrip() + "\n")
