"""The downloadable artifact: the quantized model directory as one reproducible tar file."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path


def write_reproducible_tar(directory: Path, tar_path: Path, top: str, files: list[str] | None = None) -> None:
    """Same files -> same bytes: sorted entries under `top/`, zero mtimes and owners, fixed modes; `files`: the
    directory's files to take (default: all of them). Written atomically: a partial tar is never left at `tar_path`."""
    paths = [p for p in directory.rglob("*") if p.is_file()] if files is None else [directory / f for f in files]
    part = tar_path.with_name(f".{tar_path.name}.part")
    try:
        with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(paths):
                info = tarfile.TarInfo(f"{top}/{path.relative_to(directory).as_posix()}")
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        os.replace(part, tar_path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def extract_artifact(tar_path: Path, dest: Path) -> Path:
    """Extract safely (no links, no paths outside `dest`); returns the model directory inside."""
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
        tops = {Path(name).parts[0] for name in tar.getnames()}
    if len(tops) != 1:
        raise ValueError(f"{tar_path}: expected one top-level directory, found {sorted(tops)}")
    return dest / tops.pop()
