"""Prometheus metrics on ``[metrics] listen`` (own registry, base units, ``convd_`` prefix)."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from convd import __version__

__all__ = ["Metrics"]


class Metrics:
    """``spool_instance`` labels the build info (and names the daemon on a shared spool);
    the label is not ``instance``, which Prometheus sets to the scrape target."""

    def __init__(self, spool_instance: str = "") -> None:
        r = self.registry = CollectorRegistry()
        self.images = Counter("convd_images_total", "Images finished, by result", ["status"], registry=r)
        self.errors = Counter("convd_errors_total", "Rejected images, by error code", ["code"], registry=r)
        self.retries = Counter("convd_retries_total", "Convert attempts retried", registry=r)
        self.bytes_read = Counter("convd_read_bytes_total", "Source bytes of finished images", registry=r)
        self.bytes_written = Counter("convd_written_bytes_total", "Bytes published to outgoing/", registry=r)
        self.hashed = Counter("convd_hashed_bytes_total", "Bytes read for checksums", registry=r)
        self.convert_seconds = Histogram(
            "convd_convert_duration_seconds", "qemu-img convert wall time", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.throughput = Histogram(
            "convd_convert_throughput_bytes_per_second", "Virtual bytes converted per second", registry=r,
            buckets=tuple(2**i * 2**20 for i in range(13)),
        )
        self.queued = Gauge("convd_queue_depth", "Files waiting in incoming/", registry=r)
        self.in_flight = Gauge("convd_in_flight", "Claimed items not yet finished", ["stage"], registry=r)
        self.progress = Gauge("convd_item_progress_ratio", "Convert progress of an item", ["item"], registry=r)
        self.reserved = Gauge("convd_workspace_reserved_bytes", "Workspace reserved by outputs", registry=r)
        self.free = Gauge("convd_workspace_available_bytes", "Workspace a new output may take", registry=r)
        self.rate_limit = Gauge("convd_rate_limit_bytes_per_second",
                                "[convert] rate_limit: bytes per second all conversions may move (0: none)",
                                registry=r)
        self.rate_in_use = Gauge("convd_rate_in_use_bytes_per_second",
                                 "Bytes per second granted to running conversions, unpacking and checksums",
                                 registry=r)
        self.fs_free = Gauge("convd_filesystem_free_bytes", "Free bytes on the spool filesystem", registry=r)
        self.rbd_reserved = Gauge("convd_rbd_pool_reserved_bytes", "Ceph pool bytes reserved by outputs being "
                                  "written ([publish] to = \"rbd\")", registry=r)
        self.rbd_available = Gauge("convd_rbd_pool_available_bytes", "Ceph pool bytes a new output may take "
                                   "(quota and ceph df's max_avail, as last asked)", registry=r)
        self.rbd_waiting = Gauge("convd_rbd_pool_waiting", "Items waiting for room in the Ceph pool", registry=r)
        self.peers = Gauge("convd_spool_instances", "Daemon instances with a directory on the spool, by state "
                           "(alive, stale, dead; by their heartbeats)", ["state"], registry=r)
        self.peer_items = Gauge("convd_spool_instance_items", "Items held in work/<instance>/, per instance",
                                ["spool_instance"], registry=r)
        self.adopted = Counter("convd_adopted_total", "Items taken over from stopped instances", registry=r)
        info = Gauge("convd_build_info", "Build information", ["version", "spool_instance"], registry=r)
        info.labels(version=__version__, spool_instance=spool_instance).set(1)
        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int) -> None:
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
