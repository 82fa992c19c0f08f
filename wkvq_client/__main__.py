"""`python -m wkvq_client`: the client commands alone (no torch import: starts in well under a second)."""

from .cli import app

app(prog_name="wkvq")
