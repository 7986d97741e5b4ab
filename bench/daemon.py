"""The benchmark's configuration of a ``convd run`` subprocess; the daemon and its spool are
``convd_testing.daemon``'s, as the tests' are."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from convd_testing.daemon import Daemon, Spool

__all__ = ["bench_daemon", "parse_ts", "write_config"]


def parse_ts(value: str) -> float:
    """structlog's ISO UTC timestamp as seconds since the epoch."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def write_config(root: Path, *, target: str, algorithms: Iterable[str], max_workers: int = 2,
                 **extra: dict[str, Any]) -> Path:
    """The config the bench runs convd with: its own spool under ``root``, JSON logs, no metrics."""
    sections: dict[str, dict[str, Any]] = {
        "spool": {"root": str(root), "instance": "bench"},
        "convert": {"max_workers": max_workers, "target_format": target},
        "limits": {"workspace": "64GiB", "min_free": "1GiB"},
        "watch": {"settle": 2.0},
        "checksum": {"algorithms": list(algorithms)},
        "log": {"format": "json", "level": "info"},
        "metrics": {"listen": ""},
    }
    for name, body in extra.items():
        sections.setdefault(name, {}).update(body)
    root.mkdir(parents=True, exist_ok=True)
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in body.items()) + "\n"
                   for name, body in sections.items())
    path = root / "convd.toml"
    path.write_text(text)
    return path


def bench_daemon(config: Path, spool: Spool, label: str) -> Daemon:
    """``convd run -c CONFIG`` for a benchmark: its log appended to ``daemon.log`` beside the config."""
    return Daemon(config, spool=spool, label=label, log_path=config.with_name("daemon.log"))
