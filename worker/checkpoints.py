"""`CheckpointStore` for the service: block checkpoints in the artifact store, recorded (uri, sha256) in the DB.

A checkpoint whose bytes no longer match the recorded sha256 is reported and treated as missing, so that block
is recomputed instead of silently trusted. Objects are named after the lease that wrote them and recorded only
under that lease's fence, so a worker that lost its lease cannot replace the new owner's checkpoints.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from sqlalchemy.orm import sessionmaker

from api.core.context import ServiceContext
from api.core.storage import ArtifactStore
from api.jobs.service import remove_objects
from api.models import BlockCheckpoint
from wkvq_core.calib.checkpoint import decode_safetensors, encode_safetensors

from .lease import Lease, LeaseLost, fence


class StorageCheckpoints:
    def __init__(self, store: ArtifactStore, sessions: sessionmaker, lease: Lease,
                 on_corrupt: Callable[[int, str], None], db_write: Callable[[Callable[[], bool], str], bool]) -> None:
        self.store, self.sessions, self.lease, self.job_id = store, sessions, lease, lease.job_id
        self.on_corrupt, self.db_write = on_corrupt, db_write

    def key(self, index: int) -> str:
        return f"jobs/{self.job_id}/checkpoints/block-{index:04d}-{self.lease.token}.safetensors"

    def save(self, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        stored = self.store.put_bytes(encode_safetensors(tensors, meta), self.key(index))

        replaced: list[str] = []

        def record() -> bool:
            with self.sessions() as session:
                if not fence(session, self.lease):
                    session.rollback()
                    return False
                row = session.get(BlockCheckpoint, (self.job_id, index))
                if row is None:
                    session.add(BlockCheckpoint(job_id=self.job_id, block_index=index, uri=stored.uri,
                                                sha256=stored.sha256, size=stored.size))
                else:
                    replaced.append(row.uri)
                    row.uri, row.sha256, row.size = stored.uri, stored.sha256, stored.size
                session.commit()
                return True

        if not self.db_write(record, f"checkpoint of block {index}"):
            self.store.delete(stored.uri)
            raise LeaseLost()
        for uri in replaced:
            if uri != stored.uri:
                self.store.delete(uri)

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        with self.sessions() as session:
            row: BlockCheckpoint | None = session.get(BlockCheckpoint, (self.job_id, index))
        if row is None:
            return None
        try:
            data = self.store.read_bytes(row.uri)
        except FileNotFoundError:
            self.on_corrupt(index, f"checkpoint of block {index} is missing from the store; recomputing")
            return None
        if hashlib.sha256(data).hexdigest() != row.sha256:
            self.on_corrupt(index, f"checkpoint of block {index} does not match its sha256; recomputing")
            return None
        return decode_safetensors(data)


def drop_checkpoints(ctx: ServiceContext, job_id: str) -> None:
    """A succeeded job's block checkpoints, objects and rows."""
    with ctx.session() as session:
        remove_objects(session, ctx.store, BlockCheckpoint, job_id)
        session.commit()
