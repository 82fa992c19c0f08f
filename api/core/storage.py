"""Artifact and checkpoint storage over fsspec: `file://` by default, `s3://` (s3fs) for a shared pool.

Objects are written under a temporary name and then moved into place, so a reader never sees half a file.
Rows in the database hold the full URI returned by `put_*`.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from dataclasses import dataclass
from typing import IO, Any, Iterator

import fsspec

CHUNK = 1 << 20


class StorageError(Exception):
    """The artifact store could not take a write (full, read-only, unreachable) or could not be read (unreachable)."""


@dataclass(frozen=True)
class StoredObject:
    uri: str
    sha256: str
    size: int


def _digest(f: IO[bytes]) -> tuple[str, int]:
    """(sha256, size) of what is left to read in `f`, read in chunks."""
    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(CHUNK), b""):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


class ArtifactStore:
    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url, **(options or {}))
        self.protocol = url.split("://", 1)[0] if "://" in url else "file"

    def uri(self, key: str) -> str:
        return f"{self.protocol}://{self._path(key)}"

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key.lstrip('/')}"

    def _path_of(self, uri: str) -> str:
        protocol, path = uri.split("://", 1) if "://" in uri else (self.protocol, uri)
        if (protocol != self.protocol or not path.startswith(self.root.rstrip("/") + "/")
                or ".." in path.split("/")):  # a local file system would resolve `..` out of the root
            raise ValueError(f"{uri} is outside the artifact store {self.uri('')}")
        return path

    def put_file(self, local_path: str, key: str) -> StoredObject:
        with open(local_path, "rb") as f:
            sha256, size = _digest(f)
        self._move_into_place(key, lambda tmp: self.fs.put_file(local_path, tmp))
        return StoredObject(self.uri(key), sha256, size)

    def put_bytes(self, data: bytes, key: str) -> StoredObject:
        self._move_into_place(key, lambda tmp: self.fs.pipe_file(tmp, data))
        return StoredObject(self.uri(key), hashlib.sha256(data).hexdigest(), len(data))

    def _move_into_place(self, key: str, write) -> None:
        """Raises StorageError (a readable message) when the store refuses the write; nothing is left behind."""
        path = self._path(key)
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            self.fs.makedirs(parent, exist_ok=True)
            write(tmp)
            self.fs.mv(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            if isinstance(exc, Exception):
                raise StorageError(f"artifact store write of {self.uri(key)} failed: {type(exc).__name__}: {exc}") from exc
            raise

    def read_bytes(self, uri: str) -> bytes:
        return self.fs.cat_file(self._path_of(uri))

    def open(self, uri: str) -> IO[bytes]:
        return self.fs.open(self._path_of(uri), "rb")

    def iter_range(self, uri: str, start: int, length: int) -> Iterator[bytes]:
        with self.open(uri) as f:
            f.seek(start)
            while length > 0:
                chunk = f.read(min(CHUNK, length))
                if not chunk:
                    return
                length -= len(chunk)
                yield chunk

    def size(self, uri: str) -> int:
        """The stored object's size as the store reports it now (not from a cached listing); FileNotFoundError
        when it is gone."""
        path = self._path_of(uri)
        self.fs.invalidate_cache(path)
        return self.fs.size(path)

    def sha256(self, uri: str) -> str:
        """The stored object's sha256, read in chunks."""
        with self.open(uri) as f:
            return _digest(f)[0]

    def download(self, uri: str, local_path: str) -> None:
        self.fs.get_file(self._path_of(uri), local_path)

    def exists(self, uri: str) -> bool:
        return self.fs.exists(self._path_of(uri))

    def delete(self, uri: str) -> None:
        path = self._path_of(uri)
        if self.fs.exists(path):
            self.fs.rm(path)

    def check(self) -> None:
        """Raises when the store cannot be reached."""
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.find(self.root, maxdepth=1)  # not ls: an object store's empty prefix is no error
