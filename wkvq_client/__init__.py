"""Python client of the WKVQuant calibration service (httpx + the API's own pydantic models; no torch, no fastapi).

    from wkvq_client import WKVQClient, load_config

    with load_config().client() as wkvq:
        job = wkvq.submit({"model": {"source": "local", "name": "stories260k"},
                           "calibration": {"source": "builtin", "name": "tinystories"}})
        wkvq.wait(job.id)
        wkvq.download(job.id, "out")
"""

from .client import ClientError, DownloadResult, StreamEnd, WKVQClient, sse_events
from .config import ClientConfig, ConfigError, config_path, load_config

__all__ = ["ClientConfig", "ClientError", "ConfigError", "DownloadResult", "StreamEnd", "WKVQClient", "config_path",
           "load_config", "sse_events"]
