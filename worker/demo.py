"""`wkvq demo`: the embedded service end to end on the shipped tiny model, over real HTTP.

Starts `wkvq serve` (SQLite, local artifact store, in-process worker), submits a W4KV4 job over REST, follows
its Server-Sent Events, downloads the artifact (sha256 checked), loads it and prints the metrics table.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from api.core.config import Settings
from api.core.context import ServiceContext
from api.core.errors import NotFound
from api.core.migrate import upgrade
from api.teams.service import team_service
from wkvq_client import ClientError, WKVQClient
from wkvq_client.progress import follow
from wkvq_core.cli import print_eval_table

from .artifact_tar import extract_artifact

out = Console(highlight=False)
DEMO_TEAM = "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_key(env: dict[str, str]) -> str:
    settings = Settings(_env_file=None, DATABASE_URL=env["WKVQ_DATABASE_URL"], STORAGE_URL=env["WKVQ_STORAGE_URL"])
    upgrade(settings.DATABASE_URL)
    ctx = ServiceContext.from_settings(settings)
    try:
        with ctx.session() as session:
            try:
                team_service.get_team(session, name=DEMO_TEAM)
            except NotFound:
                team_service.create_team(session, name=DEMO_TEAM)
            return team_service.create_key(session, team_name=DEMO_TEAM, name="wkvq demo").key
    finally:
        ctx.close()


def _wait_ready(base: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}; see {log}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server was not ready after {timeout:.0f}s; see {log}")


def run_demo(
    data_dir: Annotated[Path, typer.Option(help="service state: SQLite database and artifact store")] = Path("wkvq-data/demo"),
    out_dir: Annotated[Path, typer.Option("--out", help="where the downloaded model is unpacked")] = Path("runs/stories260k-w4kv4"),
    nsamples: int = 64,
    seqlen: int = 256,
    epochs: int = 2,
) -> None:
    """Start the embedded service, quantize the shipped tiny model to W4KV4 over REST, download and verify it."""
    from wkvq_core.artifact import load_quantized, verify_manifest

    data_dir = data_dir.resolve()
    env = os.environ | {"WKVQ_DATABASE_URL": f"sqlite:///{data_dir}/wkvq.db", "WKVQ_STORAGE_URL": str(data_dir / "store"),
                        "WKVQ_DISPATCHER": "local", "WKVQ_POLL_SECONDS": "0.5", "HF_HUB_OFFLINE": "1"}
    key = _demo_key(env)
    port, log = _free_port(), data_dir / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "ab") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(port), "--no-migrate"],
                                  env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_ready(base, server, log)
        out.print(f"service up at {base} (SQLite + local store in {data_dir}, log {log})")
        with WKVQClient(base, key, timeout=30) as client:
            body = {"model": {"source": "local", "name": "stories260k"},
                    "calibration": {"source": "builtin", "name": "tinystories"},
                    "config": {"group_size": -1, "nsamples": nsamples, "seqlen": seqlen, "epochs": epochs}}
            job = client.submit(body)
            out.print(f"job {job.id} submitted: stories260k W4KV4, {nsamples} x {seqlen} tokens, {epochs} epochs")
            follow(client, job.id, out)
            job = client.get(job.id)
            if job.status != "succeeded":
                out.print(f"error: job {job.status}: {job.error}")
                raise typer.Exit(1)
            metrics = client.metrics(job.id)
            with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
                sha256 = client.download(job.id, tmp).sha256  # resumable, sha256 checked twice
                model_dir = extract_artifact(Path(tmp) / "model.tar", Path(tmp) / "x")
                verify_manifest(model_dir)
                load_quantized(model_dir)
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(out_dir, ignore_errors=True)
                shutil.move(model_dir, out_dir)
        out.print(f"artifact model.tar sha256 {sha256} verified; unpacked to {out_dir} (loads with load_quantized)")
        print_eval_table(metrics["eval"])
    except ClientError as exc:
        out.print(f"error: {exc}")
        raise typer.Exit(2) from None
    finally:
        server.terminate()
        server.wait(timeout=30)
