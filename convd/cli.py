"""Command line: ``run``, ``inspect``, ``convert``, ``check-config``, ``status``, ``cancel``, ``--version``.

Exit codes follow the contract: 0 success, 1 failure or unsafe input, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from convd import __version__
from convd.config import TARGET_FORMATS, Config, default_config, dump, load, resolve_config_path
from convd.errors import ConfigError, ItemError, StartupError

__all__ = ["main"]


def _load_config(arg: str | None, *, optional: bool) -> Config:
    path = resolve_config_path(arg)
    if optional and arg is None and not os.path.exists(path):
        return default_config()
    return load(path)


def _config_or_none(arg: str | None, *, optional: bool = False, prefix: str = "") -> Config | None:
    """The config, or None after telling the user why not (exit 1 follows)."""
    try:
        return _load_config(arg, optional=optional)
    except ConfigError as exc:
        print(f"convd: {prefix}{exc}", file=sys.stderr)
        return None


def _use_pidfd_child_watcher() -> None:
    """Python 3.11 waits for each child in a thread of its own; a pidfd needs none.

    (3.12 picks pidfds by itself and deprecates child watchers.)
    """
    if sys.version_info >= (3, 12):
        return
    import asyncio

    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return  # kernel older than 5.3: keep the default
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from convd import logs
    from convd.app import Daemon

    cfg = _config_or_none(args.config)
    if cfg is None:
        return 1
    logs.setup(cfg.log.format, cfg.log.level)
    import structlog

    log = structlog.get_logger(__name__)
    # The intake probes for writers with a read lease; a writer opening the
    # file while it is held makes the kernel send SIGIO, whose default action
    # kills.  A handler, not SIG_IGN, so qemu-img children start with the default.
    signal.signal(signal.SIGIO, lambda signum, frame: None)
    _use_pidfd_child_watcher()
    try:
        anyio.run(Daemon(cfg).run)
    except StartupError as exc:
        log.error("cannot start", error=str(exc))
        print(f"convd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from convd.image.inspection import inspect_path

    out: dict[str, Any] = {"file": args.file}
    rc = 0
    try:
        insp = inspect_path(args.file)
        out.update(format=insp.format, virtual_size=insp.virtual_size, size=insp.size,
                   safe=True, reasons=[], matched=insp.matched)
    except ItemError as exc:
        out.update(format=exc.detected, safe=False, code=exc.code, reasons=[exc.message])
        rc = 1
    except OSError as exc:
        out.update(safe=False, code="unreadable", reasons=[f"{exc.strerror}: {args.file}"])
        rc = 1
    if args.json:
        print(json.dumps(out, indent=2))
    elif out["safe"]:
        print(f"{args.file}: {out['format']}, virtual size {out['virtual_size']} bytes, "
              f"file size {out['size']} bytes: safe")
    else:
        print(f"{args.file}: unsafe ({out['code']}): {'; '.join(out['reasons'])}")
    return rc


def cmd_convert(args: argparse.Namespace) -> int:
    import anyio

    from convd import logs
    from convd.convert import convert_one

    cfg = _config_or_none(args.config, optional=True)
    if cfg is None:
        return 1
    if not os.path.lexists(args.src):
        print(f"convd: {args.src}: no such file", file=sys.stderr)
        return 1
    # The outcome is the one `convd: CODE: message` line (or the record on
    # stdout): log lines below error would repeat it or break the JSON.
    logs.setup("console" if sys.stderr.isatty() else cfg.log.format, "error")
    try:
        rec = anyio.run(convert_one, cfg, Path(args.src), Path(args.dst), args.to)
    except ConfigError as exc:
        print(f"convd: {exc}", file=sys.stderr)
        return 1
    if rec["status"] == "failed":
        print(f"convd: {rec['error']['code']}: {rec['error']['message']}", file=sys.stderr)
        return 1
    print(json.dumps(rec, indent=2))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config_or_none(args.config, prefix="invalid configuration: ")
    if cfg is None:
        return 1
    print(f"# effective configuration from {cfg.source}")
    print(_toml(dump(cfg)))
    return 0


def _toml(data: dict[str, Any]) -> str:
    lines = []
    for section, body in data.items():
        lines.append(f"[{section}]")
        tables = {}
        for k, v in body.items():
            if isinstance(v, dict):
                tables[k] = v
            else:
                lines.append(f"{k} = {json.dumps(v)}")
        for k, v in tables.items():
            inner = ", ".join(f"{json.dumps(kk)} = {json.dumps(vv)}" for kk, vv in v.items())
            lines.append(f"{k} = {{{inner}}}")
        lines.append("")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from convd.status import read_status, render

    cfg = _config_or_none(args.config)
    if cfg is None:
        return 1
    st = read_status(cfg)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(render(st, now=time.time()))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from convd.cancel import cancel

    cfg = _config_or_none(args.config)
    if cfg is None:
        return 1
    try:
        rc, text = cancel(cfg, args.name, wait=args.wait)
    except OSError as exc:
        print(f"convd: cannot cancel {args.name}: {exc}", file=sys.stderr)
        return 1
    print(f"convd: {text}", file=sys.stderr if rc else sys.stdout)
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convd", description="Safe disk image conversion daemon")
    p.add_argument("--version", action="version", version=f"convd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", help="config file (default: $CONVD_CONFIG, then /etc/convd/convd.toml)")

    r = sub.add_parser("run", help="run the daemon in the foreground")
    with_config(r)
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="safe format detection; never runs qemu-img")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="one image through the same stages as the daemon")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", metavar="FMT", choices=TARGET_FORMATS,
                   help=f"target format: {', '.join(TARGET_FORMATS)} (default: the config's target_format)")
    with_config(c)
    c.set_defaults(func=cmd_convert)

    k = sub.add_parser("check-config", help="validate and print the effective configuration")
    with_config(k)
    k.set_defaults(func=cmd_check_config)

    s = sub.add_parser("status", help="queue, in-flight items, reserved space, counters")
    with_config(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    x = sub.add_parser("cancel", help="give up on an item: it ends in failed/ with code cancelled")
    x.add_argument("name", help="the item's name (its file name in incoming/)")
    with_config(x)
    x.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for a running daemon to act (default 30)")
    x.set_defaults(func=cmd_cancel)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `convd status | head`: the reader has gone; say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
