"""A Rich progress bar fed by a job's Server-Sent Events (`wkvq watch`, `wkvq submit --wait`, `wkvq demo`)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .client import ClientError, StreamEnd, WKVQClient

STATE_KINDS = ("started", "succeeded", "failed", "cancelled", "requeued")
# events whose message is worth a line above the bar
NOTEWORTHY = ("failed", "requeued", "retried", "cancel_requested", "checkpoint_corrupt")


def follow(client: WKVQClient, job_id: str, console: Console, last_event_id: int = 0) -> str:
    """Show block i/n, epoch and loss until the job ends; returns its final status."""
    client.get(job_id)  # a 404 or an unreachable server fails here, before any bar is drawn
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("queued", total=None)
        for event in client.events(job_id, last_event_id):
            if isinstance(event, StreamEnd):
                return event.status
            if event.n_blocks:
                progress.update(task, total=event.n_blocks)
            if event.kind in ("block_end", "block_resumed") and event.block is not None:
                progress.update(task, completed=event.block + 1)
            if event.kind == "epoch_end" and event.block is not None:
                loss = "" if event.loss is None else f" loss {event.loss:.4f}"
                progress.update(task, description=f"block {event.block + 1} epoch {event.epoch}/{event.epochs}{loss}")
            elif event.kind in STATE_KINDS:
                progress.update(task, description=event.kind)
            elif event.kind == "stage" and event.message:  # loading, calibrating, evaluating, writing, publishing
                progress.update(task, description=event.message)
            if event.kind in NOTEWORTHY and event.message:
                progress.console.print(f"{event.kind}: {escape(event.message)}", soft_wrap=True)
    raise ClientError(None, f"the event stream of job {job_id} ended without its end event")
