"""Messages that leave the process (a job's `error`, its events) name no path or host of the deployment: the
artifact store's root, DATA_DIR, MODELS_DIR, the system temp dir and the database's location become placeholders
(`<store>/jobs/...`), so a team reading its job learns what went wrong but not where the service keeps things."""

from __future__ import annotations

import re
import tempfile

from sqlalchemy.engine import make_url

from .context import ServiceContext


def _locations(ctx: ServiceContext) -> dict[str, str]:
    """{text to hide: placeholder}; a location under another (the store under DATA_DIR) is matched first."""
    settings = ctx.settings
    database = make_url(settings.DATABASE_URL)
    locations = {ctx.store.root: "<store>", str(settings.DATA_DIR): "<data>", str(settings.MODELS_DIR): "<models>",
                 tempfile.gettempdir(): "<tmp>"}
    if settings.is_sqlite:
        locations[database.database or ""] = "<database>"
    else:
        locations[database.render_as_string(hide_password=False)] = "<database>"
        locations[database.render_as_string(hide_password=True)] = "<database>"
        locations[database.host or ""] = "<database-host>"
    return {text.rstrip("/"): name for text, name in locations.items() if text.rstrip("/")}


def public_message(text: str, ctx: ServiceContext) -> str:
    """`text` with every location of `_locations` (with or without a `scheme://` before it) replaced by its
    placeholder, where it stands as a whole path or host: `/tmp/x` becomes `<tmp>/x`, `/var/tmp/x` stays."""
    for location, placeholder in sorted(_locations(ctx).items(), key=lambda item: -len(item[0])):
        pattern = rf"(?<![\w.-])(?:[a-z][a-z0-9+.-]*://)?{re.escape(location)}(?![\w.-])"
        text = re.sub(pattern, placeholder, text)
    return text
