"""Where a benchmark's figures came from: the code version and repository-relative paths. No heavy imports, so
that every benchmark script (and `api_load.py`'s load generator) can use it."""

from __future__ import annotations

import datetime
import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_version(*paths: str) -> str:
    """Commit of the checkout, plus a digest of any uncommitted changes under `paths` (what the benchmark runs)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True).stdout

    try:
        commit, diff = git("rev-parse", "--short", "HEAD").strip() or "unknown", git("diff", "HEAD", "--", *paths)
    except OSError:
        return "unknown"
    if not diff:
        return commit
    return (f"{commit} + uncommitted changes to {', '.join(paths)} "
            f"(diff sha256 {hashlib.sha256(diff.encode()).hexdigest()[:10]})")


def shown(path: str | Path) -> str:
    """A path relative to the repository root when it lies inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def section(title: str, started: datetime.datetime, code: str, versions: str, body: str, write: bool) -> str:
    """A RESULTS.md section of a run started at `started` (UTC): the command, runtime and machine load, the code and
    `versions`, then `body`; printed, and appended to benchmarks/RESULTS.md when `write`."""
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n".join([
        f"## {title} {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`; runtime {minutes:.0f} min (cached runs reused); load "
        f"average {load} on {os.cpu_count()} CPUs at the end",
        f"- code {code}; {versions}",
        body,
    ])
    print(text)
    if write:
        append_to_results(text)
    return text


def append_to_results(text: str) -> None:
    """Append a section to benchmarks/RESULTS.md, after a blank line."""
    with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n" + text.rstrip("\n") + "\n")
