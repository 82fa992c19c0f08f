"""The suite runs on parallel pytest-xdist workers (README's test command, which CI runs), and what the workers share
is kept apart."""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tests.service import processes

REPO = Path(__file__).resolve().parents[1]


def test_the_test_command_runs_on_parallel_workers():
    readme = (REPO / "README.md").read_text()
    command = readme.split("<!-- test-command -->", 1)[1].strip().splitlines()[0]
    assert re.search(r"\.venv/bin/python -m pytest .*-n (auto|[2-9])", command), command
    # by module (or class): a module's fixtures are computed once; not loadgroup: pytest 9.2 broke its xdist_group
    # marks (pytest-xdist issue 1386)
    assert "--dist loadscope" in command, command
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert "pytest-xdist" in {Requirement(r).name for r in dev}


def test_free_ports_are_outside_the_ephemeral_range_and_apart_between_workers(monkeypatch):
    """An outgoing connection or a bind(0) takes ports of the ephemeral range: one of them could take a port between
    free_port() and the server's bind. Two xdist workers draw from disjoint slices."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    handed_out = [processes.free_port() for _ in range(50)]
    assert len(set(handed_out)) == 50 and max(handed_out) < ephemeral_low, handed_out
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    slices = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        slices.append(set(itertools.islice(processes._port_candidates(), ephemeral_low)))
    assert not slices[0] & slices[1] and max(slices[0] | slices[1]) < ephemeral_low

