"""The ``NAME.json`` record (contract section 2)."""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

from convd import __version__
from convd.errors import ItemError
from convd.pipeline.item import Item

__all__ = ["SCHEMA", "build"]

SCHEMA = 1


def build(item: Item, status: str, *, target: dict[str, Any] | None = None,
          error: ItemError | None = None) -> dict[str, Any]:
    timings = {k: round(v, 6) for k, v in item.timings.items()}
    timings["total"] = round(time.monotonic() - item.started, 6)
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "name": item.name,
        "status": status,
        "source": {**item.source, **(item.container or {})},
    }
    if item.source_checksums:
        rec["source"]["checksums"] = dict(item.source_checksums)
    if error is not None:
        rec["error"] = {"code": error.code, "message": error.message}
    else:
        rec["target"] = target
    rec["timings"] = timings
    rec["attempts"] = max(1, item.claim.attempts)
    rec["finished_at"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rec["convd_version"] = __version__
    return rec
