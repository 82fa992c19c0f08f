"""Where the client finds the service and its key: environment first, then a TOML file.

    WKVQ_URL      default http://127.0.0.1:8000
    WKVQ_API_KEY  a team key, wkvq_...
    WKVQ_CONFIG   the file (default $XDG_CONFIG_HOME/wkvq/config.toml, i.e. ~/.config/wkvq/config.toml):

        url = "https://wkvq.example.org"
        api_key = "wkvq_..."
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .client import WKVQClient

DEFAULT_URL = "http://127.0.0.1:8000"
KEYS = ("url", "api_key")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str

    def client(self, timeout: float = 30.0) -> WKVQClient:
        return WKVQClient(self.url, self.api_key, timeout=timeout)


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("WKVQ_CONFIG"):
        return Path(env["WKVQ_CONFIG"]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]).expanduser() if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "wkvq" / "config.toml"


def _read_file(path: Path, required: bool) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"WKVQ_CONFIG={path}: no such file") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {' and '.join(KEYS)}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key} must be a string")
    return data


def load_config(env: Mapping[str, str] | None = None) -> ClientConfig:
    """URL and key: WKVQ_URL / WKVQ_API_KEY win over the config file; ConfigError when there is no key."""
    env = os.environ if env is None else env
    path = config_path(env)
    file = _read_file(path, required=bool(env.get("WKVQ_CONFIG")))
    url = (env.get("WKVQ_URL") or file.get("url") or DEFAULT_URL).strip()
    key = (env.get("WKVQ_API_KEY") or file.get("api_key") or "").strip()
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"service URL {url!r} must start with http:// or https:// (WKVQ_URL or url in {path})")
    if not key:
        raise ConfigError(f"no API key: set WKVQ_API_KEY or api_key in {path} "
                          "(a team key, issued with `wkvq admin create-key TEAM`)")
    return ClientConfig(url=url, api_key=key)
