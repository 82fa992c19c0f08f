"""`wkvq`: the library commands (quantize, eval, generate, export) plus the service: serve, worker, migrate, admin."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import OperationalError

from api.core.config import DispatcherKind, LogFormat, Settings
from api.core.context import ServiceContext
from api.core.errors import ServiceError
from api.core.migrate import upgrade
from api.teams.service import team_service
from api.teams.usage import per_minute_limit, queued_limit, usage_service
from wkvq_client.cli import app as client_app
from wkvq_core.cli import app as core_app

from .demo import run_demo
from .logging import configure_logging

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="WKVQuant: W4 + KV4 post-training quantization, as a library CLI and a calibration service.")
app.add_typer(core_app)
app.add_typer(client_app)  # submit, status, watch, download, jobs, cancel, retry, datasets, upload
admin = typer.Typer(no_args_is_help=True, help="Teams and API keys, in the service database: the one `wkvq serve` "
                                                 "uses with the same --data-dir / WKVQ_* settings.")
app.add_typer(admin, name="admin")
app.command("demo")(run_demo)
out = Console(highlight=False)
log = logging.getLogger(__name__)
DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="service state (wkvq.db, store/) where WKVQ_DATABASE_URL / WKVQ_STORAGE_URL are not set "
                       "(default: $WKVQ_DATA_DIR, else ./wkvq-data)")]


def _settings(data_dir: Path | None = None) -> Settings:
    try:
        return Settings() if data_dir is None else Settings(DATA_DIR=data_dir)  # the option wins over the environment
    except ValueError as exc:
        out.print(f"error: invalid settings: {exc}")
        raise typer.Exit(2) from None


def shown(text: str) -> str:
    """`text` as printed to the admin's terminal: Rich markup escaped, control characters (ANSI escapes of names
    stored before names were checked) written as \\xNN."""
    return escape("".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text))


def _worker_id(label: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{label}"


def _print_database(settings: Settings) -> None:
    print(f"database: {settings.database_display}", file=sys.stderr)


def _upgrade(settings: Settings) -> None:
    """Bring the schema up to date; an unreachable or unusable database ends with one error line."""
    try:
        upgrade(settings.DATABASE_URL)
    except (OperationalError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        out.print(f"error: cannot open the database {settings.database_display}: {reason}", markup=False,
                  soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Bring the database schema to the latest revision."""
    settings = _settings(data_dir)
    _print_database(settings)
    _upgrade(settings)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="in-process workers when WKVQ_DISPATCHER=local")] = 1,
    processes: Annotated[int, typer.Option(min=1, help="API server processes (uvicorn workers) sharing the port; "
                                                       "more than 1 only with WKVQ_DISPATCHER=celery")] = 1,
    migrate_db: Annotated[bool, typer.Option("--migrate/--no-migrate", help="upgrade the schema first")] = True,
    data_dir: DataDir = None,
) -> None:
    """Run the API (and, in the embedded local mode, in-process workers and the reaper)."""
    import uvicorn

    from api.core.server import http_protocol
    from api.main import create_app

    from .local import LocalWorker
    from .presence import PresenceThread
    from .reaper import ReaperThread
    from .retention import remove_stale_workdirs
    from .runner import JobRunner

    settings = _settings(data_dir)
    if processes > 1 and settings.DISPATCHER == DispatcherKind.LOCAL:
        out.print("error: --processes above 1 needs WKVQ_DISPATCHER=celery: in the embedded mode a submission wakes "
                  "the in-process workers of the process that took it")
        raise typer.Exit(2)
    configure_logging(settings.LOG_FORMAT)
    log.info("database: %s; artifact store: %s", settings.database_display, settings.STORAGE_URL)
    if migrate_db:
        _upgrade(settings)
    ctx = ServiceContext.from_settings(settings)
    stop = threading.Event()
    ReaperThread(ctx, stop).start()
    if settings.DISPATCHER == DispatcherKind.LOCAL:
        remove_stale_workdirs()
        for i in range(workers):
            runner = JobRunner(ctx, _worker_id(f"local-{i}"))
            PresenceThread(ctx, runner, settings.GPU_CLASSES, settings.DEVICE, stop).start()
            LocalWorker(runner, settings.GPU_CLASSES, stop, ctx.dispatcher.wakeup).start()
    http = http_protocol(settings.REQUEST_HEAD_TIMEOUT_SECONDS)
    try:
        if processes > 1:  # each process builds its own app (api_app); this one supervises them and reaps
            os.environ["WKVQ_DATA_DIR"] = str(settings.DATA_DIR)  # the same state as this process's settings
            uvicorn.run("worker.cli:api_app", factory=True, workers=processes, host=host, port=port, http=http,
                        log_level="info", log_config=None)
        else:
            uvicorn.run(create_app(ctx), host=host, port=port, http=http, log_level="info",
                        log_config=None)  # our handler
    finally:
        stop.set()


def api_app():
    """The app of one `serve --processes N` API process: its own logging, database pool and broker connection."""
    from api.main import create_app

    configure_logging(Settings().LOG_FORMAT)
    return create_app()  # owns its context: closed when the process stops


@app.command()
def worker(
    queue: Annotated[list[str], typer.Option(help="GPU class(es) to take jobs from; default: the first configured")] = [],
    gpus: Annotated[Optional[str], typer.Option(help="GPU ids, e.g. 0 or 0,1 (one worker process per GPU)")] = None,
    data_dir: DataDir = None,
) -> None:
    """Run a GPU worker: Celery (WKVQ_DISPATCHER=celery) or database polling (local)."""
    settings = _settings(data_dir)
    queues = queue or settings.GPU_CLASSES[:1]
    unknown = sorted(set(queues) - set(settings.GPU_CLASSES))
    if unknown:
        out.print(f"error: unknown GPU class {', '.join(unknown)}; configured: {', '.join(settings.GPU_CLASSES)}")
        raise typer.Exit(2)
    devices = [d.strip() for d in gpus.split(",")] if gpus else []
    if len(devices) > 1:
        raise typer.Exit(_one_process_per_gpu(queues, devices, settings.DATA_DIR))
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[0]
    _run_worker(settings, queues, devices[0] if devices else "cpu")


def _one_process_per_gpu(queues: list[str], devices: list[str], data_dir: Path) -> int:
    args = [arg for q in queues for arg in ("--queue", q)] + ["--data-dir", str(data_dir)]
    children = [subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", *args, "--gpus", d]) for d in devices]

    def forward(signum, _frame) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def _run_worker(settings: Settings, queues: list[str], device: str) -> None:
    from .celery_app import create_celery
    from .local import LocalWorker
    from .presence import PresenceThread
    from .reaper import ReaperThread
    from .retention import remove_stale_workdirs
    from .runner import JobRunner

    worker_id = _worker_id(f"{'+'.join(queues)}:{device if device == 'cpu' else f'gpu{device}'}")
    configure_logging(settings.LOG_FORMAT, worker_id=worker_id)
    log.info("database: %s; artifact store: %s", settings.database_display, settings.STORAGE_URL)
    ctx = ServiceContext.from_settings(settings)
    runner = JobRunner(ctx, worker_id)
    stop = threading.Event()
    remove_stale_workdirs()
    ReaperThread(ctx, stop).start()
    PresenceThread(ctx, runner, queues, device, stop).start()
    if settings.DISPATCHER == DispatcherKind.CELERY:
        name = f"wkvq-{'+'.join(queues)}-{device}-{os.getpid()}@{socket.gethostname()}"
        quiet = ["--quiet"] if settings.LOG_FORMAT == LogFormat.JSON else []  # no banner between the JSON lines
        create_celery(settings, runner, queues).worker_main([
            *quiet, "worker", "--queues", ",".join(queues), "--pool", "solo", "--concurrency", "1",
            "--prefetch-multiplier", "1", "--hostname", name, "--without-gossip", "--without-mingle",
            "--loglevel", "INFO",
        ])
    else:
        LocalWorker(runner, queues, stop).run()


@admin.command("create-team")
def create_team(name: str, data_dir: DataDir = None) -> None:
    """Create a team."""
    _admin(lambda ctx, s: team_service.create_team(s, name=name), data_dir)
    out.print(f"team {shown(name)} created")


INT_COLUMN_MAX = 2**31 - 1  # the 32-bit integer columns of max_running, max_queued, max_submissions_per_minute
MAX_QUOTA_GB = 9e9  # 9e18 bytes: the column's 64-bit integer


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a number of GB")
    return value


@admin.command("set-team")
def set_team(
    team: str,
    weight: Annotated[Optional[float], typer.Option(help="share of the pool relative to other teams (default 1)")] = None,
    max_running: Annotated[Optional[int], typer.Option(
        min=0, max=INT_COLUMN_MAX, help="jobs running at once, at most; 0: no cap")] = None,
    storage_quota_gb: Annotated[Optional[float], typer.Option(
        min=0, max=MAX_QUOTA_GB, callback=_finite,
        help="datasets, artifacts and checkpoints kept, in GB; 0: the service default (WKVQ_TEAM_STORAGE_QUOTA_GB)")] = None,
    max_queued: Annotated[Optional[int], typer.Option(
        min=0, max=INT_COLUMN_MAX,
        help="jobs queued at once, at most; 0: the service default (WKVQ_TEAM_MAX_QUEUED)")] = None,
    submissions_per_minute: Annotated[Optional[int], typer.Option(
        min=0, max=INT_COLUMN_MAX,
        help="jobs submitted in any minute, at most; 0: the service default (WKVQ_TEAM_SUBMISSIONS_PER_MINUTE)")] = None,
    data_dir: DataDir = None,
) -> None:
    """Set a team's fair-share weight, running-job cap, storage quota and submission limits."""
    quota = None if storage_quota_gb is None else round(storage_quota_gb * 1e9)
    _admin(lambda ctx, s: team_service.configure(s, name=team, weight=weight, max_running=max_running,
                                                 storage_quota_bytes=quota, max_queued=max_queued,
                                                 max_submissions_per_minute=submissions_per_minute), data_dir)
    list_teams(data_dir)


@admin.command("list-teams")
def list_teams(data_dir: DataDir = None) -> None:
    """Teams with their weight, running cap, storage quota, submission limits and what they use now."""
    def read(ctx, session):
        return [(team, usage_service.team_usage(session, ctx.settings, team=team),
                 queued_limit(ctx.settings, team), per_minute_limit(ctx.settings, team))
                for team in team_service.list_teams(session)]

    table = Table("team", "weight", "max running", "running", "queued / max", "per minute", "storage used", "quota")
    for team, usage, queued_cap, per_minute in _admin(read, data_dir):
        table.add_row(shown(team.name), f"{team.weight:g}", str(team.max_running or "–"), str(usage.running),
                      f"{usage.queued} / {queued_cap or '–'}", str(per_minute or "–"),
                      f"{usage.stored_bytes / 1e9:.3f} GB",
                      f"{usage.quota_bytes / 1e9:g} GB" if usage.quota_bytes is not None else "none")
    out.print(table)


@admin.command("create-key")
def create_key(team: str, name: Annotated[str, typer.Option(help="a label for the key")] = "",
               data_dir: DataDir = None) -> None:
    """Issue an API key for TEAM; the key is printed once and only its hash is stored."""
    issued = _admin(lambda ctx, s: team_service.create_key(s, team_name=team, name=name), data_dir)
    print(issued.key)


@admin.command("revoke-key")
def revoke_key(prefix: str, data_dir: DataDir = None) -> None:
    """Revoke the key with this visible PREFIX (the part after `wkvq_`)."""
    _admin(lambda ctx, s: team_service.revoke_key(s, prefix=prefix), data_dir)
    out.print(f"key {shown(prefix)} revoked")


@admin.command("list-keys")
def list_keys(data_dir: DataDir = None) -> None:
    """Teams and their keys (prefix, label, revoked)."""
    rows = _admin(lambda ctx, s: team_service.list_keys(s), data_dir)
    table = Table("team", "prefix", "name", "created", "revoked")
    for key, team in rows:
        table.add_row(shown(team.name), key.prefix, shown(key.name), f"{key.created_at:%Y-%m-%d %H:%M}",
                      f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "")
    out.print(table)


def _admin(action, data_dir: Path | None):
    settings = _settings(data_dir)
    _print_database(settings)  # on stderr: stdout is the result (create-key's key)
    _upgrade(settings)
    ctx = ServiceContext.from_settings(settings)
    try:
        with ctx.session() as session:
            return action(ctx, session)
    except ServiceError as exc:
        out.print(f"error: {shown(exc.message)}")
        raise typer.Exit(2) from None
    finally:
        ctx.close()


if __name__ == "__main__":
    app()
