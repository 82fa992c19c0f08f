"""The service's user commands: submit, status, watch, download, jobs, cancel, retry, datasets, upload.

Server and key from WKVQ_URL / WKVQ_API_KEY or ~/.config/wkvq/config.toml (see wkvq_client.config). Merged into
the main `wkvq` app (worker/cli.py); `python -m wkvq_client` runs these commands alone, without the library's
torch start-up time.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, NoReturn, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from .client import TERMINAL, ClientError, WKVQClient
from .config import ConfigError, load_config
from .progress import follow

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Client of the WKVQuant calibration service (WKVQ_URL, WKVQ_API_KEY or "
                       "~/.config/wkvq/config.toml).")
# Piped output (scripts, CI logs) gets wide tables instead of Rich's 80 columns; --json is the stable format.
out = Console(highlight=False, soft_wrap=True,
              width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SPEC_FORMS = "builtin:NAME, upload:PATH, dataset:ID or hf:NAME[:CONFIG]:SPLIT[:FIELD]"
STATUS_STYLE = {"queued": "dim", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "yellow"}


class Status(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Loss(str, Enum):
    mae = "mae"
    mse = "mse"


JobId = Annotated[str, typer.Argument(help="a job id (from `wkvq submit` or `wkvq jobs`)", show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (the API's response) for scripts.")]


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", emoji=False)
    raise typer.Exit(2)


@contextmanager
def _client() -> Iterator[WKVQClient]:
    """A client from the environment / config file; ClientError and ConfigError end the command with exit 2."""
    try:
        config = load_config()
    except ConfigError as exc:
        _fail(str(exc))
    client = config.client()
    try:
        yield client
    except ClientError as exc:
        _fail(str(exc))
    finally:
        client.close()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


# ---------------------------------------------------------------------- specs


def model_spec(model: str, hf: bool) -> dict[str, str]:
    """MODEL: a model directory name under the server's WKVQ_MODELS_DIR, or with --hf a hub id[@revision]."""
    if hf:
        ident, _, revision = model.partition("@")
        if not ident:
            _fail(f"MODEL {model!r}: expected a hub id such as meta-llama/Llama-2-7b-hf[@revision]")
        return {"source": "hf", "id": ident} | ({"revision": revision} if revision else {})
    if "/" in model or "@" in model:
        _fail(f"MODEL {model!r} is not a local model name; add --hf for a Hugging Face hub id[@revision]")
    return {"source": "local", "name": model}


def data_spec(spec: str, option: str, upload: Callable[[Path], str]) -> dict[str, str]:
    """A calibration / evaluation SPEC as the API's DataSpec; `upload(path)` returns the id of an uploaded file."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        _fail(f"{option} {spec!r}: expected {SPEC_FORMS}")
    if kind == "builtin":
        return {"source": "builtin", "name": rest}
    if kind == "dataset":
        return {"source": "upload", "dataset_id": rest}
    if kind == "upload":
        path = Path(rest).expanduser()
        if not path.is_file():
            _fail(f"{option} {spec!r}: {path} is not a file")
        return {"source": "upload", "dataset_id": upload(path)}
    if kind == "hf":
        parts = rest.split(":")
        if len(parts) not in (2, 3, 4) or not all(parts):
            _fail(f"{option} {spec!r}: expected hf:NAME[:CONFIG]:SPLIT[:FIELD]")
        if len(parts) == 2:
            return {"source": "hf", "name": parts[0], "split": parts[1]}
        result = {"source": "hf", "name": parts[0], "config": parts[1], "split": parts[2]}
        return result | ({"field": parts[3]} if len(parts) == 4 else {})
    _fail(f"{option} {spec!r}: unknown source {kind!r}; expected {SPEC_FORMS}")


# ---------------------------------------------------------------------- formatting


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone().strftime("%Y-%m-%d %H:%M")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _status(job) -> str:
    text = f"[{STATUS_STYLE.get(job.status, '')}]{job.status}[/]"
    if job.cancel_requested and job.status not in TERMINAL:
        text += " (cancel requested)"
    return text


def _model(spec: dict[str, Any]) -> str:
    if spec.get("source") == "hf":
        return f"{spec['id']}@{spec['revision']}" if spec.get("revision") else spec["id"]
    return str(spec.get("name"))


def _data(spec: dict[str, Any] | None) -> str:
    if spec is None:
        return "-"
    if spec["source"] == "builtin":
        return f"builtin:{spec['name']}"
    if spec["source"] == "upload":
        return f"dataset:{spec['dataset_id']}"
    parts = [spec["name"], spec.get("config"), spec.get("split", "train")]
    field = spec.get("field", "text")
    return "hf:" + ":".join(p for p in parts if p) + (f":{field}" if field != "text" else "")


def _blocks(job) -> str:
    return f"{job.current_block}/{job.total_blocks}" if job.total_blocks else "-"


def _config(config: dict[str, Any]) -> str:
    kv_group = config.get("kv_group_size") or "head_dim"
    target = config.get("target", "runtime") + (f" ({config['kv_cache_type']} cache)" if config.get("kv_cache_type")
                                                else "")
    return (f"{target}, W{config['w_bits']} KV{config['kv_bits']}, group {config['group_size']}, KV group {kv_group}, "
            f"CRR k {config['crr_k']} ({config['loss']}), {config['epochs']} epochs, "
            f"{config['nsamples']} x {config['seqlen']} tokens, seed {config['seed']}")


def _summary(job) -> str:
    took = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
    text = f"job {job.id} {_status(job)}"
    if took is not None:
        text += f" in {_duration(took)}"
    text += f": blocks {_blocks(job)}"
    if job.last_loss is not None:
        text += f", last loss {job.last_loss:.5g}"
    if job.error:
        text += f"\n[red]{escape(job.error)}[/]"
    return text


# ---------------------------------------------------------------------- commands


@app.command()
def submit(
    model: Annotated[str, typer.Argument(help="A local model name on the server, or with --hf a hub id\\[@revision].",
                                         show_default=False)],
    calib: Annotated[str, typer.Option("--calib", help=f"Calibration text: {SPEC_FORMS}.", show_default=False)],
    eval_spec: Annotated[Optional[str], typer.Option("--eval", help="Held-out text (same SPEC forms).")] = None,
    w_bits: Annotated[int, typer.Option("--w-bits", help="Weight bits (2-8, 16 = off).")] = 4,
    kv_bits: Annotated[int, typer.Option("--kv-bits", help="KV-cache bits (2-8, 16 = off).")] = 4,
    group_size: Annotated[Optional[int], typer.Option(
        "--group-size", help="Weight group along the input dim; -1 = per row (default: the server picks the largest of "
                             "128, 64, 32 dividing the model's linears, else -1).", show_default=False)] = None,
    kv_group_size: Annotated[Optional[int], typer.Option(help="KV quantization group (default: head_dim).")] = None,
    crr_k: Annotated[Optional[int], typer.Option(help="Blocks in the cross-block reconstruction loss (default: the "
                                                      "method's: paper 5, recommended 2).", show_default=False)] = None,
    loss: Annotated[Loss, typer.Option(help="mae (WKVQuant) or mse (OmniQuant with k=1).")] = Loss.mae,
    epochs: int = 5,
    nsamples: int = 128,
    seqlen: Annotated[Optional[int], typer.Option(help="Tokens per calibration window (default: 2048, or the model's "
                                                       "max_position_embeddings if smaller).", show_default=False)
                      ] = None,
    seed: int = 0,
    lwc: Annotated[bool, typer.Option(help="Learnable weight clipping.")] = True,
    smoothing: Annotated[bool, typer.Option(help="2D KV smoothing.")] = True,
    poq: Annotated[bool, typer.Option(help="Past-only quantization.")] = True,
    method: Annotated[str, typer.Option(help="paper or recommended (the KV options that won on held-out text).")
                      ] = "recommended",
    target: Annotated[str, typer.Option(help="runtime (the packed artifact), llamacpp (also a GGUF; calibrated "
                                             "and evaluated for llama.cpp's own KV cache) or vllm (also "
                                             "model-vllm.tar, a directory for `vllm serve`; calibrated and evaluated "
                                             "for vLLM's int4_per_token_head KV cache).")] = "runtime",
    kv_cache_type: Annotated[Optional[str], typer.Option(
        "--kv-cache-type", help="The target engine's KV cache type: llamacpp q4_0 | q4_1 | q8_0 | f16, vllm "
                                "int4_per_token_head | auto (default: from --kv-bits).", show_default=False)] = None,
    gpu_class: Annotated[Optional[str], typer.Option(help="GPU class (default: the server's first).")] = None,
    priority: Annotated[int, typer.Option(help="-100..100, higher runs first.")] = 0,
    idempotency_key: Annotated[Optional[str], typer.Option(help="Resubmitting with the same key and body returns "
                                                                "the first job.")] = None,
    hf: Annotated[bool, typer.Option("--hf", help="MODEL is a Hugging Face hub id\\[@revision].")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends; exit 1 unless it succeeded.")
                    ] = False,
    as_json: AsJson = False,
) -> None:
    """Submit a calibration job."""
    model_body = model_spec(model, hf)
    with _client() as client:
        uploaded: dict[Path, str] = {}

        def upload(path: Path) -> str:
            if path.resolve() not in uploaded:
                try:
                    dataset = client.upload_dataset(path)
                except OSError as exc:
                    _fail(f"{path}: cannot read ({exc.strerror})")
                err.print(f"uploaded {escape(str(path))} as dataset {dataset.id} ({dataset.chars} characters)")
                uploaded[path.resolve()] = dataset.id
            return uploaded[path.resolve()]

        body: dict[str, Any] = {
            "model": model_body,
            "calibration": data_spec(calib, "--calib", upload),
            "config": {"w_bits": w_bits, "kv_bits": kv_bits, "kv_group_size": kv_group_size,
                       "loss": loss.value, "epochs": epochs, "nsamples": nsamples, "seed": seed, "lwc": lwc,
                       "smoothing": smoothing, "poq": poq, "method": method, "target": target}
                      | {name: value for name, value in (("group_size", group_size), ("seqlen", seqlen),
                                                         ("kv_cache_type", kv_cache_type), ("crr_k", crr_k))
                         if value is not None},  # left out: the server's defaults for the model
            "priority": priority,
        }
        if eval_spec is not None:
            body["evaluation"] = data_spec(eval_spec, "--eval", upload)
        if gpu_class is not None:
            body["gpu_class"] = gpu_class
        job = client.submit(body, idempotency_key=idempotency_key)
        if not wait:
            if as_json:
                _print_json(job.model_dump(mode="json"))
            else:
                out.print(f"job {job.id} {_status(job)}: {escape(_model(job.model))} "
                          f"W{w_bits}KV{kv_bits} on {escape(job.gpu_class)}; follow it with `wkvq watch {job.id}`")
            return
        (err if as_json else out).print(f"job {job.id} submitted")
        follow(client, job.id, err if as_json else out)
        job = client.get(job.id)
    if as_json:
        _print_json(job.model_dump(mode="json"))
    else:
        out.print(_summary(job))
    raise typer.Exit(0 if job.status == "succeeded" else 1)


@app.command()
def status(job_id: JobId, as_json: AsJson = False) -> None:
    """A job's state: status, block i/n, epoch, ETA, heartbeat age, last loss, worker, error."""
    with _client() as client:
        job = client.get(job_id)
    if as_json:
        _print_json(job.model_dump(mode="json"))
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("status", _status(job)),
        ("model", escape(_model(job.model)) + (" (hub)" if job.model.get("source") == "hf" else "")),
        ("config", _config(job.config)),
        ("calibration", escape(_data(job.calibration))),
        ("evaluation", escape(_data(job.evaluation)) if job.evaluation else
                       "the built-in set's held-out text" if job.calibration.get("source") == "builtin" else "none"),
        ("blocks", f"{_blocks(job)} ({job.progress:.0%})"),
        ("epoch", f"{job.epoch}/{job.config['epochs']}" if job.epoch is not None else "-"),
        ("ETA", _duration(job.eta_seconds)),
        ("heartbeat", f"{_duration(job.heartbeat_age_seconds)} ago"
                      if job.heartbeat_age_seconds is not None and job.status not in TERMINAL else "-"),
        ("last loss", f"{job.last_loss:.5g}" if job.last_loss is not None else "-"),
        ("worker", escape(job.worker or "-")),
        ("attempts", f"{job.attempts}/{job.max_attempts}"),
        ("GPU class", f"{escape(job.gpu_class)}, priority {job.priority}"),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
    ]
    if job.error:
        rows.append(("error", f"[red]{escape(job.error)}[/]"))
    for name, value in rows:
        table.add_row(name, value)
    out.print(Panel(table, title=f"job {job.id}", expand=False))


@app.command()
def watch(job_id: JobId) -> None:
    """Follow a job's progress (Server-Sent Events) until it ends; exit 0 if it succeeded, else 1."""
    with _client() as client:
        follow(client, job_id, out)
        job = client.get(job_id)
    out.print(_summary(job))
    raise typer.Exit(0 if job.status == "succeeded" else 1)


@app.command()
def download(
    job_id: JobId,
    directory: Annotated[Path, typer.Argument(help="Where the artifact goes (created if missing).", show_default=False)],
    name: Annotated[str, typer.Option(help="The artifact's name: model.tar, for a llamacpp job also model.gguf, "
                                           "for a vllm job model-vllm.tar.")] = "model.tar",
    extract: Annotated[bool, typer.Option("--extract", help="Unpack the model directory next to a tar.")] = False,
) -> None:
    """Download a job's artifact: resumes a partial download, checks its sha256, renames it into place."""
    with _client() as client:
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task(name, total=None)
            try:
                result = client.download(job_id, directory, name,
                                         on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                         total=total))
            except OSError as exc:
                _fail(f"{directory}: {exc.strerror or exc}")
    if result.received == 0 and result.resumed_from == result.size:
        note = "already downloaded; "
    elif result.resumed_from:
        note = f"resumed at byte {result.resumed_from}; "
    else:
        note = ""
    out.print(f"{escape(str(result.path))}: {result.size} bytes, {note}sha256 {result.sha256} verified")
    if extract:
        from worker.artifact_tar import extract_artifact

        try:
            model_dir = extract_artifact(result.path, directory)
        except (tarfile.TarError, ValueError, OSError) as exc:
            _fail(f"{result.path}: cannot unpack ({exc})")
        out.print(f"unpacked to {escape(str(model_dir))}")


@app.command()
def jobs(
    status: Annotated[Optional[Status], typer.Option(help="Only jobs in this state.")] = None,
    gpu_class: Annotated[Optional[str], typer.Option(help="Only jobs of this GPU class.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1-100).")] = 20,
    offset: Annotated[int, typer.Option(help="Skip this many (newest first).")] = 0,
    as_json: AsJson = False,
) -> None:
    """Your team's jobs, newest first."""
    with _client() as client:
        page = client.list(status=status.value if status else None, gpu_class=gpu_class, limit=limit, offset=offset)
    if as_json:
        _print_json(page.model_dump(mode="json"))
        return
    caption = (f"{offset + 1}-{offset + len(page.data)} of {page.count}" if page.data
               else f"no jobs ({page.count} in all)")
    table = Table(box=box.SIMPLE_HEAD, caption=caption, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=32)  # never shortened: it is what the other commands take
    for column in ("status", "model", "W/KV", "blocks", "last loss", "GPU class", "created"):
        table.add_column(column, overflow="fold")
    for job in page.data:
        table.add_row(job.id, _status(job), escape(_model(job.model)),
                      f"{job.config['w_bits']}/{job.config['kv_bits']}", _blocks(job),
                      f"{job.last_loss:.4g}" if job.last_loss is not None else "-", escape(job.gpu_class),
                      _when(job.created_at))
    out.print(table)


@app.command()
def cancel(job_id: JobId) -> None:
    """Cancel a job: a queued one at once, a running one within seconds (checkpoints are kept); refused once the job
    is publishing its artifact."""
    with _client() as client:
        job = client.cancel(job_id)
    if job.status == "cancelled":
        out.print(f"job {job.id} cancelled")
    else:
        out.print(f"job {job.id}: cancel requested; it stops within seconds"
                  f"{' (stage ' + job.stage + ')' if job.stage else ''} (`wkvq retry` resumes it)")


@app.command()
def delete(job_id: JobId) -> None:
    """Delete a job: cancel it if needed, and remove its artifact, checkpoints, metrics and events for good."""
    with _client() as client:
        done = client.delete(job_id)
    out.print(f"job {job_id} deleted" if done else f"job {job_id}: cancel requested; deleted once it has stopped")


@app.command("delete-dataset")
def delete_dataset(dataset_id: Annotated[str, typer.Argument(help="an uploaded dataset's id")]) -> None:
    """Delete an uploaded dataset (refused while a queued or running job uses it)."""
    with _client() as client:
        client.delete_dataset(dataset_id)
    out.print(f"dataset {dataset_id} deleted")


@app.command()
def retry(job_id: JobId) -> None:
    """Requeue a failed or cancelled job; it resumes from its last block checkpoint."""
    with _client() as client:
        job = client.retry(job_id)
    out.print(f"job {job.id} {_status(job)}; it resumes after block {job.current_block}"
              f"{'/' + str(job.total_blocks) if job.total_blocks else ''}")


@app.command()
def datasets(as_json: AsJson = False) -> None:
    """Your team's uploaded calibration texts."""
    with _client() as client:
        rows = client.datasets()
    if as_json:
        _print_json([row.model_dump(mode="json") for row in rows])
        return
    table = Table(box=box.SIMPLE_HEAD, caption=None if rows else "none yet: `wkvq upload FILE`", pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=32)
    for column in ("file", "characters", "bytes", "sha256", "uploaded"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.id, escape(row.filename), str(row.chars), str(row.size), row.sha256[:12],
                      _when(row.created_at))
    out.print(table)


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(help="A UTF-8 text file.", show_default=False)],
    as_json: AsJson = False,
) -> None:
    """Upload a calibration text; use it with `--calib dataset:ID`."""
    with _client() as client:
        try:
            dataset = client.upload_dataset(path)
        except OSError as exc:
            _fail(f"{path}: cannot read ({exc.strerror or exc})")
    if as_json:
        _print_json(dataset.model_dump(mode="json"))
        return
    out.print(f"dataset {dataset.id}: {escape(dataset.filename)}, {dataset.chars} characters, sha256 "
              f"{dataset.sha256[:12]}; use it with --calib dataset:{dataset.id}")


if __name__ == "__main__":
    app()
