"""Prometheus metrics of the service, read from the database at scrape time.

The database is the truth about jobs and workers, so every API replica reports the same job, queue and worker
numbers without keeping counters of its own: `ServiceCollector` runs a handful of aggregate queries when
`/metrics` is scraped. Only the HTTP request metrics (see `middleware.py`) are per process.

Each app has its own `CollectorRegistry` (several apps in one test process must not share the global one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from datetime import timedelta

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Float, case, cast, extract, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ColumnElement

from ..core.context import ServiceContext
from ..core.db import utcnow
from ..models import Job, JobEvent, JobStatus, Worker

log = logging.getLogger(__name__)

# A whole job: minutes (tiny models) to a day (WKVQ_JOB_TIME_LIMIT_SECONDS).
JOB_DURATION_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
# One decoder block: fractions of a second (CPU, tiny model) to an hour (70B, many epochs).
BLOCK_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# A worker counts as online when it announced itself within this many heartbeat intervals.
ONLINE_HEARTBEATS = 3
# Workers not seen for this long are left out of the per-worker gauge (every restart is a new worker id).
WORKER_RETENTION = timedelta(hours=1)
TERMINAL = [s.value for s in JobStatus if s.terminal]


def _job_seconds(engine: Engine) -> ColumnElement:
    """finished_at - started_at in seconds, in the database's own dialect."""
    if engine.dialect.name == "sqlite":
        return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
    return extract("epoch", Job.finished_at - Job.started_at)


def _bucket_columns(value: ColumnElement, buckets: Sequence[float]) -> list[ColumnElement]:
    """count, sum and one cumulative count per bucket bound, aggregated by the database."""
    return [func.count(), func.coalesce(func.sum(cast(value, Float)), 0.0)] + [
        func.coalesce(func.sum(case((value <= bound, 1), else_=0)), 0) for bound in buckets]


def _histogram_buckets(row: Sequence, buckets: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    count, total, *cumulative = row
    pairs = [(_le(bound), float(n or 0)) for bound, n in zip(buckets, cumulative)] + [("+Inf", float(count or 0))]
    return pairs, float(total or 0.0)


def _le(bound: float) -> str:
    return str(bound) if not math.isinf(bound) else "+Inf"


class ServiceCollector(Collector):
    """Job, queue, block and worker metrics from the database; `wkvq_up{component="database"}` says if it answered."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("wkvq_up", "1 when the component answered during this scrape, 0 otherwise",
                               labels=["component"])
        try:
            families = self._from_database()
        except (sa_exc.DBAPIError, sa_exc.TimeoutError, OSError) as exc:  # an outage is a value, not a failed scrape
            log.warning("metrics: database unavailable: %s", exc)
            up.add_metric(["database"], 0.0)
            yield up
            return
        up.add_metric(["database"], 1.0)
        yield up
        yield from families

    def _from_database(self) -> list[Metric]:
        settings = self.ctx.settings
        now = utcnow()
        with self.ctx.session() as session:
            counts = session.execute(
                select(Job.status, Job.gpu_class, func.count()).group_by(Job.status, Job.gpu_class)).all()
            oldest = session.execute(
                select(Job.gpu_class, func.min(Job.created_at))
                .where(Job.status == JobStatus.QUEUED.value).group_by(Job.gpu_class)).all()
            seconds = _job_seconds(self.ctx.engine)
            durations = session.execute(
                select(Job.status, *_bucket_columns(seconds, JOB_DURATION_BUCKETS))
                .where(Job.started_at.is_not(None), Job.finished_at.is_not(None)).group_by(Job.status)).all()
            blocks = session.execute(
                select(*_bucket_columns(JobEvent.seconds, BLOCK_DURATION_BUCKETS))
                .where(JobEvent.kind == "block_end", JobEvent.seconds.is_not(None))).one()
            workers = session.execute(
                select(Worker.id, Worker.last_seen_at).where(Worker.last_seen_at >= now - WORKER_RETENTION)
                .order_by(Worker.id)).all()

        by_status = {s.value: 0 for s in JobStatus}
        classes = list(dict.fromkeys([*settings.GPU_CLASSES, *(gpu_class for _, gpu_class, _ in counts)]))
        queued = dict.fromkeys(classes, 0)
        running = dict.fromkeys(classes, 0)
        for status, gpu_class, n in counts:
            by_status[status] = by_status.get(status, 0) + n
            if status == JobStatus.QUEUED.value:
                queued[gpu_class] += n
            elif status == JobStatus.RUNNING.value:
                running[gpu_class] += n

        jobs = GaugeMetricFamily("wkvq_jobs", "Jobs in the database by status", labels=["status"])
        for status, n in by_status.items():
            jobs.add_metric([status], n)
        depth = GaugeMetricFamily("wkvq_queue_depth", "Queued jobs per GPU class (every configured class listed)",
                                  labels=["gpu_class"])
        for gpu_class, n in queued.items():
            depth.add_metric([gpu_class], n)
        running_family = GaugeMetricFamily("wkvq_jobs_running", "Running jobs per GPU class", labels=["gpu_class"])
        for gpu_class, n in running.items():
            running_family.add_metric([gpu_class], n)
        waiting = GaugeMetricFamily("wkvq_queue_oldest_age_seconds",
                                    "Age of the oldest queued job per GPU class (0 when none is queued)",
                                    labels=["gpu_class"])
        ages = {gpu_class: (now - created).total_seconds() for gpu_class, created in oldest if created is not None}
        for gpu_class in classes:
            waiting.add_metric([gpu_class], max(ages.get(gpu_class, 0.0), 0.0))

        job_hist = HistogramMetricFamily(
            "wkvq_job_duration_seconds",
            "Run time of finished jobs (finished_at - started_at, first start to end, all attempts), by final status; "
            "computed from the jobs table at scrape time over every finished job",
            labels=["status"])
        found = {row[0]: row[1:] for row in durations}
        for status in dict.fromkeys([*TERMINAL, *found]):
            buckets, total = _histogram_buckets(found.get(status, (0, 0.0, *[0] * len(JOB_DURATION_BUCKETS))),
                                                JOB_DURATION_BUCKETS)
            job_hist.add_metric([status], buckets, total)
        block_hist = HistogramMetricFamily(
            "wkvq_block_duration_seconds",
            "Calibration time of one decoder block (job_events kind block_end, field seconds), computed from the "
            "database at scrape time over all jobs")
        buckets, total = _histogram_buckets(blocks, BLOCK_DURATION_BUCKETS)
        block_hist.add_metric([], buckets, total)

        online_after = now - timedelta(seconds=ONLINE_HEARTBEATS * settings.HEARTBEAT_SECONDS)
        online_family = GaugeMetricFamily(
            "wkvq_workers_online", f"Workers seen within the last {ONLINE_HEARTBEATS} heartbeat intervals")
        online_family.add_metric([], sum(seen >= online_after for _, seen in workers))
        families = [jobs, depth, running_family, waiting, job_hist, block_hist, online_family]
        if settings.METRICS_WORKER_LABELS:  # a worker id names its host: not for an unauthenticated page by default
            last_seen = GaugeMetricFamily(
                "wkvq_worker_last_seen_seconds",
                f"Seconds since a worker last announced itself (every WKVQ_HEARTBEAT_SECONDS); workers not seen for "
                f"{int(WORKER_RETENTION.total_seconds())} s are left out", labels=["worker"])
            for worker_id, seen in workers:
                last_seen.add_metric([worker_id], max((now - seen).total_seconds(), 0.0))
            families.append(last_seen)
        return families


def build_registry(ctx: ServiceContext) -> CollectorRegistry:
    """A registry of this app only: the database collector and this process's CPU/memory."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ServiceCollector(ctx))
    ProcessCollector(namespace="wkvq", registry=registry)
    return registry
