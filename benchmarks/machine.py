"""What every benchmark records about where it ran, and how it writes its BENCHMARKS.md section.

    from machine import cpu_name, git_commit, load_average, write_section
    write_section(ROOT / "BENCHMARKS.md", "bench_sft", "## LoRA SFT ...\n\n- command: ...")

Each script owns one section, delimited by `<!-- NAME:start -->` / `<!-- NAME:end -->`; a re-run
replaces its own section and leaves the others as they are.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short commit of the checkout, with `-dirty` when it has uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True
            ).stdout.strip()
        except OSError:  # no git on the machine (a GPU pod's bare image)
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. `1.9, 2.5, 4.1`."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the `name` section of the markdown file at `path`, or append it; nothing else."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def publish(name: str, lines: list[str], *, write: bool) -> None:
    """Print a benchmark's section and, with `write`, put it into BENCHMARKS.md."""
    section = "\n".join(lines)
    print(section)
    if write:
        write_section(ROOT / "BENCHMARKS.md", name, section)
