"""The client's list of remotes: ``$XDG_CONFIG_HOME/minicloud/remotes.json`` plus one pinned CA file per remote.

A remote is a URL, an API key and the cluster CA that was pinned when it was added (trust on first use, like ssh's
known_hosts). The files are private to the user (0600/0700).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

REMOTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "minicloud"


@dataclass
class Remote:
    name: str
    url: str
    token: str | None
    ca_fingerprint: str

    def ca_path(self) -> Path:
        return config_dir() / "remotes" / f"{self.name}.crt"

    def ca_pem(self) -> str:
        return self.ca_path().read_text()


@dataclass
class RemoteConfig:
    remotes: dict[str, Remote]
    default: str | None = None


def _file() -> Path:
    return config_dir() / "remotes.json"


def load_config() -> RemoteConfig:
    try:
        data = json.loads(_file().read_text())
    except FileNotFoundError:
        return RemoteConfig(remotes={})
    remotes = {name: Remote(name=name, **r) for name, r in data.get("remotes", {}).items()}
    return RemoteConfig(remotes=remotes, default=data.get("default"))


def load_remotes() -> dict[str, Remote]:
    return load_config().remotes


def save_config(cfg: RemoteConfig) -> None:
    d = config_dir()
    (d / "remotes").mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {
        "default": cfg.default,
        "remotes": {n: {k: v for k, v in asdict(r).items() if k != "name"} for n, r in sorted(cfg.remotes.items())},
    }
    tmp = _file().with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, _file())


def save_ca(name: str, pem: str) -> None:
    path = config_dir() / "remotes" / f"{name}.crt"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(pem)
