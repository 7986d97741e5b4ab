"""Configuration: a frozen dataclass tree, loaded and validated once from TOML.

Every key has a default; an unknown key, a wrong type or an impossible value
raises :class:`ConfigError` with a message naming the key.  SIGHUP swaps the
whole tree for a freshly loaded one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convd.errors import ConfigError
from convd.units import format_size

__all__ = [
    "ALLOWED_SOURCE_FORMATS",
    "CONTAINER_KINDS",
    "DEFAULT_CONFIG_PATH",
    "PUBLISH_TO",
    "TARGET_FORMATS",
    "Config",
    "DetectConfig",
    "PublishConfig",
    "RbdConfig",
    "TargetConfig",
    "default_config",
    "dump",
    "format_size",
    "load",
    "parse_duration",
    "parse_size",
    "resolve_config_path",
    "target_with",
]

DEFAULT_CONFIG_PATH = "/etc/convd/convd.toml"
TARGET_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx")
# QED is not listed: the inspector bans it whatever the configuration says.
ALLOWED_SOURCE_FORMATS = ("raw", "gpt", "iso", "qcow2", "vmdk", "vdi", "vpc", "vhdx")
# Containers convd unpacks (an extension key, [convert] containers; see convd/image/containers/).
CONTAINER_KINDS = ("gzip", "xz", "zstd", "bzip2", "tar", "ova")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_NUM_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any, key: str = "size") -> int:
    """``123``, ``"512MiB"``, ``"10GB"`` → bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size (bytes or a string like '2GiB'), got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < 2**63:
            raise ConfigError(f"{key}: must be between 0 and 2^63, got {value}")
        return value
    if isinstance(value, str):
        m = _NUM_UNIT.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            n = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
            if not math.isfinite(n) or n >= 2**63:
                raise ConfigError(f"{key}: {value!r} is too large")
            return int(n)
    raise ConfigError(f"{key}: expected a size (bytes or a string like '2GiB'), got {value!r}")


def parse_duration(value: Any, key: str = "duration") -> float:
    """``30``, ``2.5``, ``"30s"``, ``"10m"``, ``"6h"`` → seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration (seconds or a string like '30s'), got {value!r}")
    if isinstance(value, (int, float)):
        if not 0 <= value < 1e9:  # also refuses nan and inf
            raise ConfigError(f"{key}: must be between 0 and 1e9 seconds, got {value}")
        return float(value)
    if isinstance(value, str):
        m = _NUM_UNIT.match(value)
        if m and m.group(2).lower() in _DURATION_UNITS:
            secs = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
            if not secs < 1e9:
                raise ConfigError(f"{key}: {value!r} is too long")
            return secs
    raise ConfigError(f"{key}: expected a duration (seconds or a string like '30s'), got {value!r}")


@dataclass(frozen=True)
class SpoolConfig:
    root: Path = Path("/var/lib/convd")
    incoming: Path = Path("/var/lib/convd/incoming")
    work: Path = Path("/var/lib/convd/work")
    outgoing: Path = Path("/var/lib/convd/outgoing")
    failed: Path = Path("/var/lib/convd/failed")
    # Names this daemon's claim directory under work/; several daemons on one
    # spool need distinct ones.  Defaults to the host name.
    instance: str = ""
    # Seconds between checks of the other instances' locks (live take-over).
    takeover_interval: float = 10.0


@dataclass(frozen=True)
class ConvertConfig:
    target_format: str = "raw"
    allowed_formats: tuple[str, ...] = ALLOWED_SOURCE_FORMATS
    containers: tuple[str, ...] = CONTAINER_KINDS  # unpacked; any other is unsupported_format
    max_workers: int = 2
    timeout: float = 6 * 3600.0
    max_attempts: int = 3
    retry_backoff: float = 5.0
    # Extra qemu-img convert arguments per source format ("*" for all),
    # replacing convd's tuned defaults for that format.
    qemu_args: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Bytes per second all conversions, unpacking and checksumming move
    # together (convd.bandwidth); 0: no limit.  Reloadable.
    rate_limit: int = 0
    # Glance's imports (a .convd-priority.NAME sidecar) go before bulk drops,
    # but after this many in a row one waiting bulk file is taken (contract
    # section 9: neither starves).
    priority_burst: int = 4


@dataclass(frozen=True)
class RawLayout:
    preallocation: str = "off"


@dataclass(frozen=True)
class Qcow2Layout:
    compat: str = "1.1"
    cluster_size: int = 64 << 10
    compression: str = "none"
    preallocation: str = "off"


@dataclass(frozen=True)
class VpcLayout:
    subformat: str = "dynamic"
    # Every input's virtual size must be a multiple of this (Azure: "1MiB");
    # 0: any size.  An input that is not is refused (unsupported_format).
    size_multiple: int = 0


@dataclass(frozen=True)
class VmdkLayout:
    subformat: str = "monolithicSparse"


@dataclass(frozen=True)
class TargetConfig:
    """``[target.FMT]``: what the output of each target format looks like (contract section 9)."""

    raw: RawLayout = field(default_factory=RawLayout)
    qcow2: Qcow2Layout = field(default_factory=Qcow2Layout)
    vpc: VpcLayout = field(default_factory=VpcLayout)
    vmdk: VmdkLayout = field(default_factory=VmdkLayout)

    def layout(self, fmt: str) -> dict[str, Any]:
        """The record's ``target.layout`` for a ``fmt`` output: its settings by name ({} for vdi, vhdx)."""
        sect = getattr(self, fmt, None)
        if sect is None:
            return {}
        out = dataclasses.asdict(sect)
        if fmt == "vpc" and not out["size_multiple"]:
            del out["size_multiple"]
        return out

    def is_default(self, fmt: str) -> bool:
        """Whether a ``fmt`` output would be what qemu-img writes by default (a passthrough may stand)."""
        sect = getattr(self, fmt, None)
        return sect is None or sect == type(sect)()


@dataclass(frozen=True)
class DetectConfig:
    # Resource limits for `qemu-img info` on an unvetted file.
    cpu_time: float = 30.0
    address_space: int = 1024**3


@dataclass(frozen=True)
class LimitsConfig:
    workspace: int = 100 * 1024**3
    min_free: int = 2 * 1024**3
    max_virtual_size: int = 4 * 1024**4
    # "auto" probes the spool filesystem at start-up; true/false overrides.
    sparse: str = "auto"


@dataclass(frozen=True)
class WatchConfig:
    settle: float = 2.0
    # None: chosen at start-up (polling on a shared filesystem, inotify otherwise).
    force_polling: bool | None = None
    rescan_interval: float = 30.0


@dataclass(frozen=True)
class ChecksumConfig:
    algorithms: tuple[str, ...] = ("sha256",)


@dataclass(frozen=True)
class LogConfig:
    format: str = "json"
    level: str = "info"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"


PUBLISH_TO = ("directory", "rbd")


@dataclass(frozen=True)
class RbdConfig:
    """``[publish.rbd]``: where and as whom an RBD publish writes (contract section 10)."""

    pool: str = "images"
    ceph_conf: Path = Path("/etc/ceph/ceph.conf")
    user: str = "convd"  # the cephx id (client.USER)
    keyring: str = ""  # "": Ceph's default search; else an absolute path
    snapshot: str = "snap"  # "" for none


@dataclass(frozen=True)
class PublishConfig:
    """``[publish]``: ``outgoing/NAME`` (``directory``) or straight into a Ceph pool (``rbd``)."""

    to: str = "directory"
    rbd: RbdConfig = field(default_factory=RbdConfig)


@dataclass(frozen=True)
class Config:
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    checksum: ChecksumConfig = field(default_factory=ChecksumConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    source: Path | None = None  # the file it was loaded from

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if not self.metrics.listen:
            return None
        host, _, port = self.metrics.listen.rpartition(":")
        return host.strip("[]"), int(port)

    def qemu_args_for(self, source_format: str) -> tuple[str, ...] | None:
        table = dict(self.convert.qemu_args)
        if source_format in table:
            return table[source_format]
        return table.get("*")


def _expect(section: str, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"[{section}] {key}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"[{section}] {key}: expected {what}, got {value!r}")
    return value


def _str_list(section: str, key: str, value: Any) -> tuple[str, ...]:
    _expect(section, key, value, list, "a list of strings")
    for v in value:
        _expect(section, key, v, str, "a list of strings")
    return tuple(value)


def _one_of(section: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    _expect(section, key, value, str, f"one of {', '.join(choices)}")
    if value not in choices:
        raise ConfigError(f"[{section}] {key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _positive(section: str, key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"[{section}] {key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _build(raw: dict[str, Any], base: Path) -> Config:
    sections = {f.name for f in dataclasses.fields(Config) if f.name != "source"}
    for name, body in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(sorted(sections))})")
        if not isinstance(body, dict):
            raise ConfigError(f"[{name}]: expected a table, got {body!r}")

    def section(name: str, cls: type) -> dict[str, Any]:
        body = dict(raw.get(name, {}))
        known = {f.name for f in dataclasses.fields(cls)}
        for key in body:
            if key not in known:
                raise ConfigError(f"unknown key [{name}] {key} (known: {', '.join(sorted(known))})")
        return body

    def path(v: Any, key: str) -> Path:
        _expect("spool", key, v, str, "a path")
        if not v:
            raise ConfigError(f"[spool] {key}: must not be empty")
        try:
            p = Path(v)
            return (p if p.is_absolute() else base / p).resolve()
        except (ValueError, OSError) as exc:
            raise ConfigError(f"[spool] {key}: {exc}") from None

    s = section("spool", SpoolConfig)
    root = path(s.get("root", "/var/lib/convd"), "root")
    instance = _expect("spool", "instance", s.get("instance", socket.gethostname()), str, "a string")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", instance or ""):
        raise ConfigError(f"[spool] instance: {instance!r} must be 1-64 of [A-Za-z0-9_.-], not starting with . or -")
    spool = SpoolConfig(
        root=root,
        incoming=path(s["incoming"], "incoming") if "incoming" in s else root / "incoming",
        work=path(s["work"], "work") if "work" in s else root / "work",
        outgoing=path(s["outgoing"], "outgoing") if "outgoing" in s else root / "outgoing",
        failed=path(s["failed"], "failed") if "failed" in s else root / "failed",
        instance=instance,
        takeover_interval=parse_duration(s.get("takeover_interval", SpoolConfig.takeover_interval),
                                         "[spool] takeover_interval"),
    )
    _positive("spool", "takeover_interval", spool.takeover_interval)
    dirs = [spool.incoming, spool.work, spool.outgoing, spool.failed]
    if len(set(dirs)) != 4:
        raise ConfigError("[spool]: incoming, work, outgoing and failed must be four different directories")

    c = section("convert", ConvertConfig)
    d = ConvertConfig()
    target = _one_of("convert", "target_format", c.get("target_format", d.target_format), TARGET_FORMATS)
    allowed = _str_list("convert", "allowed_formats", c.get("allowed_formats", list(d.allowed_formats)))
    for fmt in allowed:
        if fmt not in ALLOWED_SOURCE_FORMATS:
            raise ConfigError(
                f"[convert] allowed_formats: {fmt!r} is not one of {', '.join(ALLOWED_SOURCE_FORMATS)}"
            )
    kinds = _str_list("convert", "containers", c.get("containers", list(d.containers)))
    for kind in kinds:
        if kind not in CONTAINER_KINDS:
            raise ConfigError(f"[convert] containers: {kind!r} is not one of {', '.join(CONTAINER_KINDS)}")
    workers = _expect("convert", "max_workers", c.get("max_workers", d.max_workers), int, "an integer")
    if not 1 <= workers <= 256:
        raise ConfigError(f"[convert] max_workers: must be between 1 and 256, got {workers}")
    attempts = _expect("convert", "max_attempts", c.get("max_attempts", d.max_attempts), int, "an integer")
    if not 1 <= attempts <= 100:
        raise ConfigError(f"[convert] max_attempts: must be between 1 and 100, got {attempts}")
    timeout = parse_duration(c.get("timeout", d.timeout), "[convert] timeout")
    _positive("convert", "timeout", timeout)
    backoff = parse_duration(c.get("retry_backoff", d.retry_backoff), "[convert] retry_backoff")
    qargs_raw = c.get("qemu_args", {})
    _expect("convert", "qemu_args", qargs_raw, dict, "a table of format = [arguments]")
    qargs = []
    for fmt, args in qargs_raw.items():
        if fmt != "*" and fmt not in ALLOWED_SOURCE_FORMATS:
            raise ConfigError(f"[convert] qemu_args: {fmt!r} is not a source format or '*'")
        args = _str_list("convert", f"qemu_args.{fmt}", args)
        for a in args:
            if a in ("-f", "-O", "-o", "-p", "-U", "--image-opts", "--target-image-opts") or a.startswith("-o"):
                raise ConfigError(f"[convert] qemu_args.{fmt}: {a!r} is set by convd and cannot be overridden")
        qargs.append((fmt, args))
    rate = parse_size(c.get("rate_limit", d.rate_limit), "[convert] rate_limit")
    if 0 < rate < 1 << 20:
        raise ConfigError(f"[convert] rate_limit: must be 0 (no limit) or at least 1MiB per second, got {rate}")
    burst = _expect("convert", "priority_burst", c.get("priority_burst", d.priority_burst), int, "an integer")
    if not 1 <= burst <= 1000:
        raise ConfigError(f"[convert] priority_burst: must be between 1 and 1000, got {burst}")
    convert = ConvertConfig(
        target_format=target, allowed_formats=allowed, containers=kinds, max_workers=workers, timeout=timeout,
        max_attempts=attempts, retry_backoff=backoff, qemu_args=tuple(qargs), rate_limit=rate,
        priority_burst=burst,
    )

    dt = section("detect", DetectConfig)
    dd = DetectConfig()
    cpu = parse_duration(dt.get("cpu_time", dd.cpu_time), "[detect] cpu_time")
    _positive("detect", "cpu_time", cpu)
    aspace = parse_size(dt.get("address_space", dd.address_space), "[detect] address_space")
    if aspace < 64 * 1024**2:
        raise ConfigError(f"[detect] address_space: must be at least 64MiB, got {aspace}")
    detect = DetectConfig(cpu_time=cpu, address_space=aspace)

    lm = section("limits", LimitsConfig)
    ld = LimitsConfig()
    workspace = parse_size(lm.get("workspace", ld.workspace), "[limits] workspace")
    _positive("limits", "workspace", workspace)
    sparse = lm.get("sparse", ld.sparse)
    if isinstance(sparse, bool):
        sparse = "true" if sparse else "false"
    sparse = _one_of("limits", "sparse", sparse, ("auto", "true", "false"))
    limits = LimitsConfig(
        workspace=workspace,
        min_free=parse_size(lm.get("min_free", ld.min_free), "[limits] min_free"),
        max_virtual_size=parse_size(lm.get("max_virtual_size", ld.max_virtual_size), "[limits] max_virtual_size"),
        sparse=sparse,
    )
    _positive("limits", "max_virtual_size", limits.max_virtual_size)

    w = section("watch", WatchConfig)
    wd = WatchConfig()
    rescan = parse_duration(w.get("rescan_interval", wd.rescan_interval), "[watch] rescan_interval")
    _positive("watch", "rescan_interval", rescan)
    watch = WatchConfig(
        settle=parse_duration(w.get("settle", wd.settle), "[watch] settle"),
        force_polling=_polling(w.get("force_polling", "auto")),
        rescan_interval=rescan,
    )

    ck = section("checksum", ChecksumConfig)
    algos = _str_list("checksum", "algorithms", ck.get("algorithms", list(ChecksumConfig().algorithms)))
    for a in algos:
        if a not in hashlib.algorithms_available or a.startswith("shake"):
            raise ConfigError(f"[checksum] algorithms: {a!r} is not a fixed-length hashlib algorithm")
    checksum = ChecksumConfig(algorithms=algos)

    lg = section("log", LogConfig)
    # Unset: JSON lines (systemd, pipes), console output on a terminal.
    default_format = "console" if sys.stdout.isatty() else "json"
    log = LogConfig(
        format=_one_of("log", "format", lg.get("format", default_format), ("json", "console")),
        level=_one_of("log", "level", str(lg.get("level", "info")).lower(), ("debug", "info", "warning", "error")),
    )

    mt = section("metrics", MetricsConfig)
    listen = _expect("metrics", "listen", mt.get("listen", MetricsConfig().listen), str, "'host:port' or ''")
    if listen:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"[metrics] listen: expected 'host:port' or '', got {listen!r}")
    metrics = MetricsConfig(listen=listen)

    publish = _publish(raw.get("publish", {}), base)
    if publish.to == "rbd" and convert.target_format != "raw":
        raise ConfigError(f"[publish] to: 'rbd' publishes raw images; [convert] target_format is "
                          f"{convert.target_format!r}")

    return Config(spool=spool, convert=convert, detect=detect, limits=limits, watch=watch,
                  checksum=checksum, log=log, metrics=metrics, target=_target(raw.get("target", {})),
                  publish=publish)


def _target(raw: dict[str, Any]) -> TargetConfig:
    """``[target.raw]``, ``[target.qcow2]``, ``[target.vpc]``, ``[target.vmdk]``.

    Refuses what qemu-img 7.2 would refuse at convert time, naming the key:
    compression with preallocation (block/qcow2.c: "Compression and
    preallocation not supported at the same time"), zstd with compat 0.10
    ("Non-zlib compression type is only supported with compatibility level
    1.1"), a cluster size that is not a power of two from 512 B to 2 MiB.
    """
    kinds = {f.name: f.type for f in dataclasses.fields(TargetConfig)}
    for fmt, body in raw.items():
        if fmt not in kinds:
            raise ConfigError(f"unknown section [target.{fmt}] (known: {', '.join(sorted(kinds))})")
        if not isinstance(body, dict):
            raise ConfigError(f"[target.{fmt}]: expected a table, got {body!r}")
    classes = {"raw": RawLayout, "qcow2": Qcow2Layout, "vpc": VpcLayout, "vmdk": VmdkLayout}

    def section(fmt: str) -> dict[str, Any]:
        body = dict(raw.get(fmt, {}))
        known = {f.name for f in dataclasses.fields(classes[fmt])}
        for key in body:
            if key not in known:
                raise ConfigError(f"unknown key [target.{fmt}] {key} (known: {', '.join(sorted(known))})")
        return body

    r = section("raw")
    rawl = RawLayout(preallocation=_one_of("target.raw", "preallocation", r.get("preallocation", "off"),
                                           ("off", "falloc", "full")))
    q = section("qcow2")
    qd = Qcow2Layout()
    compat = q.get("compat", qd.compat)
    if isinstance(compat, float):
        compat = {0.1: "0.10", 1.1: "1.1"}.get(compat, str(compat))  # compat = 1.1 unquoted
    compat = _one_of("target.qcow2", "compat", compat, ("0.10", "1.1"))
    cluster = parse_size(q.get("cluster_size", qd.cluster_size), "[target.qcow2] cluster_size")
    if not (512 <= cluster <= 2 << 20 and cluster & (cluster - 1) == 0):
        raise ConfigError(f"[target.qcow2] cluster_size: must be a power of two from 512 to 2MiB, got {cluster}")
    compression = _one_of("target.qcow2", "compression", q.get("compression", qd.compression),
                          ("none", "zlib", "zstd"))
    prealloc = _one_of("target.qcow2", "preallocation", q.get("preallocation", qd.preallocation),
                       ("off", "metadata", "falloc", "full"))
    if compression != "none" and prealloc != "off":
        raise ConfigError(f"[target.qcow2] preallocation: {prealloc!r} with compression = {compression!r}: "
                          "qemu-img cannot compress and preallocate at the same time")
    if compression == "zstd" and compat == "0.10":
        raise ConfigError("[target.qcow2] compression: 'zstd' needs compat = '1.1' "
                          "(qcow2 0.10 knows zlib only)")
    qcow2 = Qcow2Layout(compat=compat, cluster_size=cluster, compression=compression, preallocation=prealloc)
    v = section("vpc")
    multiple = parse_size(v.get("size_multiple", 0), "[target.vpc] size_multiple")
    if multiple % 512:
        raise ConfigError(f"[target.vpc] size_multiple: must be a multiple of 512 bytes, got {multiple}")
    vpc = VpcLayout(subformat=_one_of("target.vpc", "subformat", v.get("subformat", "dynamic"),
                                      ("dynamic", "fixed")), size_multiple=multiple)
    m = section("vmdk")
    vmdk = VmdkLayout(subformat=_one_of("target.vmdk", "subformat", m.get("subformat", "monolithicSparse"),
                                        ("monolithicSparse", "streamOptimized")))
    return TargetConfig(raw=rawl, qcow2=qcow2, vpc=vpc, vmdk=vmdk)


def target_with(base: TargetConfig, request: dict[str, dict[str, Any]]) -> TargetConfig:
    """``base`` with a producer's layout request (``{FMT: {KEY: value}}``, as
    ``[target.FMT]``) laid over it, key by key.

    Judged as check-config judges ``[target.*]`` (the same rules, the same
    messages naming the key); raises ``ConfigError``.
    """
    merged: dict[str, dict[str, Any]] = {}
    for fmt in ("raw", "qcow2", "vpc", "vmdk"):
        merged[fmt] = {**dataclasses.asdict(getattr(base, fmt)), **request.get(fmt, {})}
    return _target(merged)


# Ceph's own rules (src/tools/rbd, librados): no '/' or '@' in pool and image
# names; a cephx id has no '.', which would split client.ID; snapshot names
# no '/' or '@' either.  Stricter here: no ':' or spaces, which qemu's
# rbd: filename syntax would have to escape.
_CEPH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,127}")


def _publish(body: dict[str, Any], base: Path) -> PublishConfig:
    """``[publish]`` and its ``[publish.rbd]`` table."""
    known = {"to", "rbd"}
    for key in body:
        if key not in known:
            raise ConfigError(f"unknown key [publish] {key} (known: {', '.join(sorted(known))})")
    to = _one_of("publish", "to", body.get("to", "directory"), PUBLISH_TO)
    r = body.get("rbd", {})
    _expect("publish", "rbd", r, dict, "a table ([publish.rbd])")
    rknown = {f.name for f in dataclasses.fields(RbdConfig)}
    for key in r:
        if key not in rknown:
            raise ConfigError(f"unknown key [publish.rbd] {key} (known: {', '.join(sorted(rknown))})")
    d = RbdConfig()

    def name(key: str, default: str, allow_empty: bool = False) -> str:
        v = _expect("publish.rbd", key, r.get(key, default), str, "a string")
        if allow_empty and v == "":
            return v
        if not _CEPH_NAME.fullmatch(v) or (key == "user" and "." in v):
            raise ConfigError(f"[publish.rbd] {key}: {v!r} must be 1-128 of [A-Za-z0-9_.+=-], not starting "
                              f"with . - + or ={' (and no . in a cephx id)' if key == 'user' else ''}")
        return v

    def path(key: str, default: str) -> Path | None:
        v = _expect("publish.rbd", key, r.get(key, default), str, "a path")
        if not v:
            return None
        p = Path(v)
        return (p if p.is_absolute() else base / p).resolve()

    conf = path("ceph_conf", str(d.ceph_conf))
    if conf is None:
        raise ConfigError("[publish.rbd] ceph_conf: must not be empty")
    return PublishConfig(to=to, rbd=RbdConfig(
        pool=name("pool", d.pool), ceph_conf=conf, user=name("user", d.user),
        keyring=str(path("keyring", "") or ""), snapshot=name("snapshot", d.snapshot, allow_empty=True),
    ))


def _polling(value: Any) -> bool | None:
    """``[watch] force_polling``: true, false, or "auto" (the default) for None."""
    if value == "auto":
        return None
    return _expect("watch", "force_polling", value, bool, 'true, false or "auto"')


def load(path: str | os.PathLike[str]) -> Config:
    """Load and validate a config file; relative paths resolve against its directory."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    cfg = _build(raw, p.resolve().parent)
    return dataclasses.replace(cfg, source=p.resolve())


def default_config() -> Config:
    """Built-in defaults (``inspect`` and ``convert`` use them without a file)."""
    return _build({}, Path.cwd())


def resolve_config_path(arg: str | None) -> str:
    return arg or os.environ.get("CONVD_CONFIG") or DEFAULT_CONFIG_PATH


def dump(cfg: Config) -> dict[str, Any]:
    """The effective configuration as plain data (for ``check-config``)."""

    def plain(v: Any) -> Any:
        if v is None:
            return "auto"  # the only None in the tree: [watch] force_polling
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            if v and all(isinstance(x, tuple) and len(x) == 2 for x in v):
                return {k: plain(x) for k, x in v}
            return [plain(x) for x in v]
        return v

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name == "source":
            continue
        sect = getattr(cfg, f.name)
        out[f.name] = {sf.name: plain(getattr(sect, sf.name)) for sf in dataclasses.fields(sect)}
    out["target"] = {fmt: dataclasses.asdict(getattr(cfg.target, fmt))
                     for fmt in (f.name for f in dataclasses.fields(TargetConfig))}
    return out
