"""``convd status``: read the daemon's snapshot and the spool, render for people or scripts.

On a spool shared by several daemons it also shows every instance under
``work/`` (see :func:`convd.cluster.instances`, which the Glance plugin
reads too): whether it runs, what it holds, so an operator can tell which
node has an item.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from convd.cluster import HEARTBEAT_STALE, STATUS_FILE, instances
from convd.config import Config, format_size
from convd.pipeline.layout import is_candidate_name

__all__ = ["HEARTBEAT_STALE", "instances", "locate", "read_status", "render"]


def locate(cfg: Config, name: str, insts: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Where item ``name`` is: ``{"where": "incoming" | "work" | "outgoing" | "failed",
    "instance": ..., "state": ...}`` (instance and state only in work/), or None."""
    sp = cfg.spool
    if os.path.lexists(sp.outgoing / f"{name}.json"):
        return {"where": "outgoing"}
    if os.path.lexists(sp.failed / f"{name}.json"):
        return {"where": "failed"}
    for inst in instances(sp.work) if insts is None else insts:
        if name in inst["items"]:
            return {"where": "work", "instance": inst["instance"], "state": inst["state"]}
    if os.path.lexists(sp.incoming / name):
        return {"where": "incoming"}
    return None


def _count(path: os.PathLike[str] | str, records: bool = False) -> int | None:
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return 0
    except PermissionError:
        return None
    if records:
        return sum(1 for n in names if n.endswith(".json") and not n.startswith("."))
    return sum(1 for n in names if is_candidate_name(n))


def read_status(cfg: Config) -> dict[str, Any]:
    """The daemon's snapshot (if one is running) plus what the spool directories hold."""
    sp = cfg.spool
    snap_path = sp.work / sp.instance / STATUS_FILE
    error = None
    try:
        snap = json.loads(snap_path.read_bytes())
    except (FileNotFoundError, ValueError):
        snap = None
    except PermissionError:
        snap, error = None, f"cannot read {snap_path}: permission denied (run as root or the convd user)"
    running = False
    if snap:
        try:
            os.kill(int(snap["pid"]), 0)
            alive = True
        except PermissionError:
            alive = True  # someone else's process: it exists
        except (OSError, KeyError, ValueError):
            alive = False
        running = alive and time.time() - float(snap.get("updated_at", 0)) < 30
    return {
        "error": error,
        "running": running,
        "daemon": snap,
        "instances": instances(sp.work),
        "spool": {
            "root": str(sp.root),
            "incoming": _count(sp.incoming),
            "outgoing": _count(sp.outgoing, records=True),
            "failed": _count(sp.failed, records=True),
        },
    }


def _age(seconds: float) -> str:
    """A heartbeat's age for people: never negative (clocks of two nodes differ a little)."""
    s = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit}"
    return f"{s:.0f} s"


def _bar(frac: float, width: int = 20) -> str:
    n = round(frac * width)
    return "[" + "#" * n + "." * (width - n) + "]"


def render(st: dict[str, Any], now: float) -> str:
    sp = st["spool"]
    n = {k: "?" if sp[k] is None else sp[k] for k in ("incoming", "outgoing", "failed")}
    lines = [f"spool {sp['root']}: {n['incoming']} in incoming/, {n['outgoing']} published, "
             f"{n['failed']} failed"]
    if st.get("error"):
        lines.append(st["error"])
    d = st.get("daemon")
    if not st["running"] or not d:
        lines.append("daemon: not running" + (" (stale snapshot)" if d else ""))
    else:
        lines += _render_daemon(d, now)
    insts = st.get("instances") or []
    own = d.get("instance") if d else None
    if any(i["instance"] != own for i in insts):
        lines.append("instances on this spool:")
        for i in insts:
            where = f"{i['host'] or '?'} pid {i['pid'] or '?'}"
            beat = "" if i["heartbeat_age"] is None else f", heartbeat {_age(i['heartbeat_age'])} ago"
            held = f", holds {len(i['items'])}: {', '.join(i['items'][:8])}" + (" …" if len(i["items"]) > 8 else "") \
                if i["items"] else ""
            lines.append(f"  {i['instance']:<20} {i['state']:<5}  {where}{beat}{held}")
    return "\n".join(lines)


def _render_daemon(d: dict[str, Any], now: float) -> list[str]:
    lines = []
    c = d["counters"]
    lines.append(f"daemon: pid {d['pid']}, instance {d['instance']}, up {now - d['started_at']:.0f} s, "
                 f"target {d['target_format']}, {d['max_workers']} workers")
    lines.append(f"queue: {d['queued']} waiting; done: {c['converted']} converted, "
                 f"{c['passthrough']} passthrough, {c['failed']} failed")
    w = d["workspace"]
    lines.append(f"workspace: {format_size(w['reserved'])} reserved of {format_size(w['limit'])}, "
                 f"{format_size(w['available'])} available, filesystem {format_size(w['filesystem_free'])} free, "
                 f"{w['waiting']} waiting for space")
    bw = d.get("bandwidth")  # absent in a snapshot of an older daemon
    if bw is not None:
        cap = f"{format_size(bw['limit'])}/s" if bw["limit"] else "no limit"
        lines.append(f"bandwidth: {cap}, {format_size(bw['in_use'])}/s granted to running work")
    r = d.get("rbd")
    if r:
        quota = f"quota {format_size(r['quota'])}, " if r["quota"] else "no quota, "
        lines.append(f"ceph pool {r['pool']}: {format_size(r['reserved'])} reserved, {format_size(r['available'])} "
                     f"available ({quota}{format_size(r['stored'])} stored), {r['waiting']} waiting for space")
    for i in d["in_flight"]:
        eta = f" ETA {i['eta']:.0f} s" if i.get("eta") is not None else ""
        lines.append(f"  {i['name']:<32} {i['stage']:<8} {_bar(i['progress'])} {i['progress'] * 100:5.1f}%"
                     f"{eta}  {i.get('source_format') or '?'}")
    if d.get("stuck"):
        lines.append(f"stuck (internal error, retried with backoff): {', '.join(d['stuck'])}")
    return lines
