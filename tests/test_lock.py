"""The locks (requirements/*.txt, written by scripts/lock.sh) agree with pyproject.toml and with what is installed.

A dependency added to or narrowed in pyproject.toml without `bash scripts/lock.sh` fails here, and so does an
environment that was not installed from the lock (the README's set-up and CI install from it).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
UNLOCKED = {"torch"}  # its build differs by machine: pinned by version in pyproject.toml, installed first


def pins(lock: str) -> dict[str, str]:
    text = (REPO / "requirements" / lock).read_text()
    found = {canonicalize_name(name): version for name, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M)}
    assert found, f"no pins in {lock}"
    return found


def declared(*extras: str, build: bool = False) -> list[Requirement]:
    project = PYPROJECT["project"]
    names = [*project["dependencies"], *(r for extra in extras for r in project["optional-dependencies"][extra])]
    if build:
        names += PYPROJECT["build-system"]["requires"]
    return [Requirement(r) for r in names]


@pytest.mark.parametrize("lock,extras", [("dev.txt", tuple(PYPROJECT["project"]["optional-dependencies"])),
                                         ("service.txt", ("s3",))])
def test_every_declared_requirement_is_locked_within_its_range(lock, extras):
    locked = pins(lock)
    for req in declared(*extras, build=True):
        name = canonicalize_name(req.name)
        if name in UNLOCKED:
            assert name not in locked
            continue
        assert name in locked, f"{req.name} is not in requirements/{lock}: run bash scripts/lock.sh"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements/{lock} pins {req.name}=={locked[name]} outside {req.specifier}: run bash scripts/lock.sh")


def test_service_lock_is_the_dev_lock_restricted():
    dev, service = pins("dev.txt"), pins("service.txt")
    assert {name: dev.get(name) for name in service} == service


def test_every_pin_has_hashes():
    for lock in ("dev.txt", "service.txt", "engine-vllm.txt"):
        entries = re.split(r"\n(?=[A-Za-z0-9])", (REPO / "requirements" / lock).read_text())
        for entry in entries:
            if "==" in entry.split("\n")[0]:
                assert "--hash=sha256:" in entry, entry.split("\n")[0]


def test_torch_is_pinned_exactly():
    (torch,) = [r for r in declared() if r.name == "torch"]
    assert len(torch.specifier) == 1 and next(iter(torch.specifier)).operator == "=="


def test_this_environment_is_installed_from_the_lock():
    mismatched = {}
    for name, version in pins("dev.txt").items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            mismatched[name] = (version, installed)
    assert not mismatched, f"installed differs from requirements/dev.txt (locked, installed): {mismatched}"
