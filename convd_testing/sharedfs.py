"""Real shared filesystems for the scale-out tests: a one-node Ceph cluster with ceph-fuse
mounts, and kernel NFSv4.2 (server and clients) inside User-Mode Linux.

The host kernel has no NFS or CephFS client, so CephFS comes through
``ceph-fuse`` (libcephfs, the MDS protocol; each mount is its own client with
its own session, caps and locks, as separate nodes would be).  Everything
binds to 127.0.0.1 on ports chosen free, lives under a temporary directory,
and :meth:`CephCluster.stop` unmounts and kills exactly the processes it
started, whatever state start-up reached.

Usable from tests (the ``ceph`` fixture in tests/test_sharedfs.py)
and from the benchmark (``bench --shared``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from convd_testing.glance_server import track, untrack

__all__ = ["CephCluster", "CephUnavailable", "UmlDisks", "UmlNfs", "ceph_missing", "uml_disks_missing",
           "uml_missing"]

CEPH_TOOLS = ("ceph-mon", "ceph-osd", "ceph-mds", "ceph-mgr", "ceph-fuse", "ceph", "monmaptool", "ceph-authtool")


class CephUnavailable(RuntimeError):
    """The machine cannot run the cluster (not root, tools missing, no FUSE)."""


def _tools_missing(tools: Iterable[str], packages: str) -> str | None:
    """Which of ``tools`` are not on PATH, and the Debian ``packages`` that bring them; None: all are."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: run `make sharedfs-deps` (apt-get install {packages})"
    return None


def ceph_missing() -> str | None:
    """Why a Ceph cluster cannot be run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (ceph daemons and FUSE mounts)"
    missing = _tools_missing(CEPH_TOOLS, "ceph-mon ceph-osd ceph-mds ceph-mgr ceph-fuse")
    if missing:
        return missing
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_mount(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == target for line in fh)


class CephCluster:
    """mon, mgr, one memstore OSD and one MDS on loopback, plus ``clients`` ceph-fuse mounts.

    ``mounts`` lists the mount points once :meth:`start` returns.
    """

    def __init__(self, base: Path, clients: int = 2, memstore_bytes: int = 6 << 30,
                 client_options: dict[str, str] | None = None, mds_options: dict[str, str] | None = None) -> None:
        self.base = base
        self.client_options = client_options or {}
        self.mds_options = mds_options or {}
        self.dir = base / "ceph"
        self.clients = clients
        self.memstore_bytes = memstore_bytes
        self.conf = self.dir / "ceph.conf"
        self.mounts = [base / f"mnt{n}" for n in range(1, clients + 1)]
        self._daemons: list[subprocess.Popen[bytes]] = []
        self._fuse: list[subprocess.Popen[bytes]] = []

    # -- helpers ------------------------------------------------------------

    def _run(self, *argv: str, timeout: float = 60.0) -> str:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if p.returncode != 0:
            raise CephUnavailable(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        return p.stdout

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", "30", *args, timeout=timeout)

    def _spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        # -f: foreground, so the process we hold is the daemon and we can kill it by pid.
        with open(self.dir / "log" / f"{os.path.basename(argv[0])}.{len(self._daemons)}.out", "wb") as log:
            p = subprocess.Popen([*argv, "-c", str(self.conf), "-f"], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=self.dir, start_new_session=True)
        track(p)
        self._daemons.append(p)
        return p

    def _wait(self, what: str, pred, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self._daemons:
                if p.poll() is not None:
                    raise CephUnavailable(f"{p.args[0]} exited with {p.returncode} while waiting for {what}"
                                          f"; logs in {self.dir / 'log'}")
            try:
                if pred():
                    return
            except CephUnavailable:
                pass
            time.sleep(0.5)
        raise CephUnavailable(f"timed out waiting for {what}; logs in {self.dir / 'log'}")

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Bring the cluster up and mount it; on any failure, tear down and raise CephUnavailable."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        d = self.dir
        for sub in ("mon", "osd0", "mds", "mgr", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        port = _free_port()
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
keyring = {d}/keyring
[client]
{"".join(f"{k} = {v}{chr(10)}" for k, v in self.client_options.items())}[mon.a]
mon data = {d}/mon
[osd.0]
osd data = {d}/osd0
[mds.a]
mds data = {d}/mds
{"".join(f"{k} = {v}{chr(10)}" for k, v in self.mds_options.items())}
[mgr.x]
mgr data = {d}/mgr
""")
        self._run("ceph-authtool", "--create-keyring", str(d / "keyring"), "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *")
        self._run("monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{port}]", "--fsid", fsid,
                  str(d / "monmap"))
        self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
                  "--keyring", str(d / "keyring"))
        self._spawn("ceph-mon", "-i", "a")
        self.ceph("osd", "create")
        self._run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs")
        self._spawn("ceph-osd", "-i", "0")
        self._spawn("ceph-mgr", "-i", "x")
        if not self.clients:  # RBD only (tests/test_rbd.py): no file system, no MDS
            return
        self.ceph("osd", "pool", "create", "cephfs_data", "8")
        self.ceph("osd", "pool", "create", "cephfs_metadata", "8")
        self.ceph("fs", "new", "cephfs", "cephfs_metadata", "cephfs_data")
        self._spawn("ceph-mds", "-i", "a")
        self._wait("the MDS to become active", lambda: "up:active" in self.ceph("mds", "stat"))
        for n, mnt in enumerate(self.mounts, start=1):
            mnt.mkdir(parents=True, exist_ok=True)
            with open(d / "log" / f"fuse{n}.out", "wb") as log:
                p = subprocess.Popen(
                    ["ceph-fuse", "-c", str(self.conf), "-n", f"client.node{n}", "-f",
                     f"--admin-socket={d}/run/fuse{n}.asok", str(mnt)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            track(p)
            self._fuse.append(p)
        self._wait("the ceph-fuse mounts", lambda: all(_is_mount(m) for m in self.mounts), timeout=60.0)
        # Without a mgr statvfs() reports 0 bytes: wait until the mounts see space.
        self._wait("statvfs to report space", lambda: os.statvfs(self.mounts[0]).f_blocks > 0, timeout=60.0)

    def rbd_pool(self, name: str) -> None:
        """Create a replicated pool and initialise it for RBD (``rbd pool init``)."""
        self.ceph("osd", "pool", "create", name, "8")
        self._run("rbd", "-c", str(self.conf), "pool", "init", name, timeout=120.0)

        def reported() -> bool:
            pools = json.loads(self.ceph("df", "--format", "json"))["pools"]
            return any(p["name"] == name and p["stats"]["max_avail"] > 0 for p in pools)
        # Until the manager reports on the new pool, `ceph df` says it has no room.
        self._wait(f"ceph df to report pool {name}", reported, timeout=120.0)

    def silence(self, n: int) -> None:
        """Cut client ``n`` (0-based) off the cluster, its node alive: its ceph-fuse is stopped
        (SIGSTOP), so it renews no MDS session and answers no cap revoke, as when the node's
        network goes away; calls on its mount block meanwhile, as on a hard network mount."""
        os.kill(self._fuse[n].pid, signal.SIGSTOP)

    def resume(self, n: int) -> None:
        """Let client ``n`` talk to the cluster again (SIGCONT)."""
        os.kill(self._fuse[n].pid, signal.SIGCONT)

    def remount(self, n: int) -> None:
        """Client ``n``'s mount point served by a new ceph-fuse, as an operator (or a
        mount unit) remounts an evicted client: the old mount is detached lazily and its
        process killed, so calls still on it fail instead of hanging."""
        mnt = self.mounts[n]
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        old = self._fuse[n]
        old.kill()
        old.wait()
        untrack(old)
        with open(self.dir / "log" / f"fuse{n + 1}.remount.out", "ab") as log:
            p = subprocess.Popen(
                ["ceph-fuse", "-c", str(self.conf), "-n", f"client.node{n + 1}", "-f",
                 f"--admin-socket={self.dir}/run/fuse{n + 1}.{time.monotonic_ns()}.asok", str(mnt)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        track(p)
        self._fuse[n] = p
        self._wait("the new ceph-fuse mount", lambda: _is_mount(mnt), timeout=60.0)

    def stop(self) -> None:
        """Unmount, then stop every process this cluster started; idempotent, never raises."""
        for mnt in self.mounts:
            for _ in range(3):
                try:
                    if not _is_mount(mnt):
                        break
                except OSError:
                    break
                # Lazy, so a process still holding a file there cannot keep the mount.
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        # The clients first (they say goodbye to the MDS), then the cluster.
        for group in (self._fuse, list(reversed(self._daemons))):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            for p in group:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                untrack(p)
        self._fuse.clear()
        self._daemons.clear()


# -- NFSv4.2 inside User-Mode Linux ----------------------------------------------------------

UML_TOOLS = ("linux.uml", "rpc.nfsd", "exportfs", "rpcbind", "mkfs.ext4", "ip", "nsenter", "modprobe")

_INIT = r"""#!/bin/sh
# PID 1 of the UML guest: private /run and NFS state (never the host's), the
# NFS modules, then the job; power off when it is done.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
S={dir}
exec > $S/guest.log 2>&1
mount -t proc proc /proc; mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/lib/nfs
mkdir -p /var/lib/nfs/sm /var/lib/nfs/sm.bak /var/lib/nfs/v4recovery /run/rpc_pipefs /run/netns
: > /var/lib/nfs/etab; : > /var/lib/nfs/rmtab
mount -t tmpfs tmpfs /mnt
mkdir -p /mnt/lib/modules && ln -s /usr/lib/uml/modules/$(uname -r) /mnt/lib/modules/$(uname -r)
hostname uml-nfs; ip link set lo up
for m in sunrpc lockd nfsd nfs nfsv3 nfsv4 veth; do modprobe -d /mnt $m; done
mount -t rpc_pipefs sunrpc /run/rpc_pipefs
mount -t nfsd nfsd /proc/fs/nfsd
sh -x $S/nfs-up.sh > $S/nfs-up.log 2>&1 && echo NFS-UP
sh $S/job.sh; echo "job rc=$?"
for n in $(seq 1 {nodes}); do umount -f -l $S/mnt$n; done
sync; poweroff -f
"""

_NFS_UP = r"""S={dir}
{leases}
mount -t ext4 /dev/ubda $S/export
rpcbind -w; rpc.statd --no-notify
for n in $(seq 1 {nodes}); do
  ip netns add node$n
  ip link add s$n type veth peer name n$n netns node$n
  ip addr add 10.99.$n.1/24 dev s$n; ip link set s$n up
  ip -n node$n addr add 10.99.$n.2/24 dev n$n; ip -n node$n link set n$n up; ip -n node$n link set lo up
  exportfs -o rw,sync,no_subtree_check,no_root_squash,insecure,fsid=0 10.99.$n.2:$S/export
done
rpc.mountd
rpc.nfsd --grace-time 10 --lease-time 10 8
for n in $(seq 1 {nodes}); do
  nsenter --net=/run/netns/node$n unshare --uts sh -c "hostname node$n; mount -t nfs4 -o vers=4.2 10.99.$n.1:/ $S/mnt$n"
  mountpoint -q $S/mnt$n || exit 1
done
"""


def uml_missing() -> str | None:
    """Why the UML NFS lab cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root"
    return _tools_missing(UML_TOOLS, "user-mode-linux nfs-kernel-server iproute2 kmod")


class UmlNfs:
    """Kernel NFSv4.2 (nfsd and ``nodes`` clients, each in its own network namespace
    with its own NFSv4 client identity) inside one User-Mode Linux guest.

    The guest's root is the host's through hostfs, so the host's venv and
    qemu-img run unchanged in it; its 10.99.n.x addresses exist only in the
    guest's own namespaces.  :meth:`run` boots the guest, mounts
    ``mnt1..mntN`` (paths the host sees only as empty directories), runs
    ``job`` (a shell script) inside, and powers off; the job reports through
    files under :attr:`dir` on hostfs.  ``leases=False`` boots with
    ``fs.leases-enable=0``: nfsd then grants no delegations.  The UML
    process group is killed whatever happens.
    """

    def __init__(self, base: Path, nodes: int = 2) -> None:
        self.dir = base / "uml"
        self.nodes = nodes
        self.mounts = [self.dir / f"mnt{n}" for n in range(1, nodes + 1)]

    def run(self, job: str, *, leases: bool = True, timeout: float = 240.0, mem: str = "1536M") -> str:
        """Boot, run ``job``, power off; returns the guest's log.  Raises on a boot or mount failure."""
        d = self.dir
        shutil.rmtree(d, ignore_errors=True)
        (d / "export").mkdir(parents=True)
        for m in self.mounts:
            m.mkdir()
        img = d / "export.img"
        with open(img, "wb") as fh:
            fh.truncate(4 << 30)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
        (d / "init.sh").write_text(_INIT.replace("{dir}", str(d)).replace("{nodes}", str(self.nodes)))
        (d / "init.sh").chmod(0o755)
        (d / "nfs-up.sh").write_text(_NFS_UP.replace("{dir}", str(d)).replace("{nodes}", str(self.nodes))
                                     .replace("{leases}", "" if leases else "sysctl -w fs.leases-enable=0"))
        (d / "job.sh").write_text(job)
        with open(d / "console.log", "wb") as console:
            p, token = _start_uml(
                ["linux.uml", f"mem={mem}", "rootfstype=hostfs", "rootflags=/", "rw", f"init={d / 'init.sh'}",
                 f"ubd0={img}", "con=null", "con0=null"], console)
            try:
                _wait_exit(p, timeout)
            finally:
                _end_uml(p, token)
                img.unlink(missing_ok=True)
        log = (d / "guest.log").read_text(errors="replace") if (d / "guest.log").exists() else ""
        if "NFS-UP" not in log:
            up = (d / "nfs-up.log").read_text(errors="replace") if (d / "nfs-up.log").exists() else ""
            raise RuntimeError(f"the UML NFS lab did not come up:\n{log[-2000:]}\n{up[-2000:]}")
        if "job rc=" not in log:
            raise RuntimeError(f"the UML job did not finish within {timeout:.0f} s:\n{log[-3000:]}")
        return log


# -- local filesystems on UML block devices, for power cuts ------------------------------------

# What each filesystem needs: mkfs (on the host), and the read-only check run in the guest.
DISK_TOOLS = {"ext4": ("mkfs.ext4", "e2fsck"), "xfs": ("mkfs.xfs", "xfs_repair")}

_DISKS_INIT = r"""#!/bin/sh
# PID 1 of the power-cut guest: a private /run; each disk's journal replayed
# (a mount and an umount, as the next boot after a power failure does), then
# checked read-only, then mounted for the job; power off when the job is done.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
S={dir}
exec > $S/guest.log 2>&1
mount -t proc proc /proc; mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
{disks}
echo DISKS-UP
sh $S/job.sh; echo "job rc=$?"
{umounts}
poweroff -f
"""

_CHECK = {"ext4": "e2fsck -fn", "xfs": "xfs_repair -n"}
# noauto_da_alloc: ext4 then gives a file renamed over another no more than
# POSIX promises (no implicit flush), so a missing fsync shows as it would on
# another filesystem.
_MOUNT_OPTS = {"ext4": "noauto_da_alloc", "xfs": "defaults"}


def uml_disks_missing(fstypes: tuple[str, ...] = ("ext4", "xfs")) -> str | None:
    """Why :class:`UmlDisks` cannot run here with these filesystems, or None if it can."""
    if os.geteuid() != 0:
        return "needs root"
    tools = ("linux.uml", *(t for fs in fstypes for t in DISK_TOOLS[fs]))
    return _tools_missing(tools, "user-mode-linux e2fsprogs xfsprogs")


def uml_has_filesystem(fstype: str) -> bool:
    """Whether the UML kernel can mount ``fstype`` (built in: Debian's has ext4 and xfs)."""
    if shutil.which("linux.uml") is None:
        return False
    release = subprocess.run(["linux.uml", "--version"], check=False, capture_output=True, text=True).stdout.strip()
    builtin = Path(f"/usr/lib/uml/modules/{release}/modules.builtin")
    try:
        return f"/fs/{fstype}/{fstype}.ko" in builtin.read_text()
    except OSError:
        return False


# Every process of one UML boot carries this in its environment (UML's kernel
# process and its I/O helpers share its memory), so the boot's processes are
# found by what they are, not by a process-group number: once a boot's group
# is gone, the kernel may give that number to another session (pid_max is
# 32768 here and a suite wraps it within minutes), and a CI run waited 30 s
# on another test's processes that way.
_UML_BOOT = "CONVD_UML_BOOT"


def _start_uml(argv: list[str], console: Any) -> tuple[subprocess.Popen[bytes], str]:
    """``linux.uml`` in a session of its own, tagged with a token of its own (see ``_UML_BOOT``)."""
    token = uuid.uuid4().hex
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                         start_new_session=True, env={**os.environ, _UML_BOOT: token})
    track(p)
    return p, token


def _uml_processes(token: str) -> list[str]:
    """The live (not zombie) processes of the boot tagged ``token``."""
    tag = f"{_UML_BOOT}={token}".encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if tag not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            out.append(pid)
    return out


def _wait_exit(p: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the UML process has exited (the guest powered off) or ``timeout`` s, without
    reaping it (``WNOWAIT``): :func:`_end_uml` may then still signal its process group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return
        time.sleep(0.05)


def _end_uml(p: subprocess.Popen[bytes], token: str, timeout: float = 30.0) -> None:
    """Power off by SIGKILL: the UML process group while its leader is not yet reaped (then the
    group's number is still its own), then any process of the boot left; returns once none is
    alive, so the next boot cannot meet a write of this one still on its way to a disk image."""
    if p.returncode is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while True:
        left = _uml_processes(token)
        if not left:
            break
        for pid in left:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"UML processes outlived SIGKILL for {timeout:.0f} s:\n"
                               + "\n".join(_describe(pid) for pid in left))
        time.sleep(0.01)
    p.wait()
    untrack(p)


def _describe(pid: str) -> str:
    """One process as the kernel sees it: name, state, what it waits in, its kernel stack."""
    parts = []
    for name in ("stat", "wchan", "stack"):
        try:
            parts.append(Path(f"/proc/{pid}/{name}").read_text().strip().replace("\n", " | "))
        except OSError as e:
            parts.append(f"({name}: {e.strerror})")
    return f"  {pid}: " + " ; ".join(parts)


class UmlDisks:
    """A User-Mode Linux guest whose disks are UML block devices (``ubd``), each
    backed by an image file on the host and holding one local filesystem.

    ``disks`` is a list of ``(fstype, bytes)``; disk ``n`` is mounted at
    :attr:`mounts` ``[n]`` in the guest (an empty directory on the host: the
    host's page cache never holds the guest's files, unlike hostfs).  The
    guest's root is the host's through hostfs, so the host's venv and qemu-img
    run unchanged in it, and files the job writes outside the mounts (its
    logs) reach the host as they are written.

    :meth:`boot` starts the guest; ``until`` (a callable given the UML
    process) returns when the power is to be cut, and the whole UML process
    group is then SIGKILLed: what the guest had not written to its block
    devices is lost, as in a power failure.  Each boot first replays each
    filesystem's journal and checks it read-only (``e2fsck -fn``,
    ``xfs_repair -n``); :meth:`fsck` gives the results.
    """

    def __init__(self, base: Path, disks: list[tuple[str, int]]) -> None:
        self.dir = base / "uml"
        self.disks = disks
        self.mounts = [self.dir / f"{fs}{n}" for n, (fs, _) in enumerate(disks)]
        self.images = [self.dir / f"{fs}{n}.img" for n, (fs, _) in enumerate(disks)]

    def make(self) -> None:
        """Create the image files and their empty filesystems."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        disks, umounts = [], []
        for n, ((fs, size), img, mnt) in enumerate(zip(self.disks, self.images, self.mounts)):
            mnt.mkdir()
            with open(img, "wb") as fh:
                fh.truncate(size)
            mkfs = ["mkfs.ext4", "-q", "-F"] if fs == "ext4" else ["mkfs.xfs", "-q", "-f"]
            subprocess.run([*mkfs, str(img)], check=True, capture_output=True)
            dev = f"/dev/ubd{chr(ord('a') + n)}"
            disks.append(f"mount -t {fs} {dev} {mnt} && umount {mnt}; {_CHECK[fs]} {dev} > $S/fsck{n}.log 2>&1; "
                         f"echo \"fsck {n} rc=$?\"\nmount -t {fs} -o {_MOUNT_OPTS[fs]} {dev} {mnt} || "
                         "{ echo MOUNT-FAILED; poweroff -f; }")
            umounts.append(f"umount {mnt}")
        (self.dir / "init.sh").write_text(_DISKS_INIT.replace("{dir}", str(self.dir))
                                          .replace("{disks}", "\n".join(disks))
                                          .replace("{umounts}", "\n".join(umounts)))
        (self.dir / "init.sh").chmod(0o755)

    def boot(self, job: str, *, until: Callable[[subprocess.Popen[bytes]], None] | None = None,
             timeout: float = 120.0, mem: str = "1024M") -> str:
        """Boot, run ``job`` (a shell script); cut the power when ``until`` returns, else
        wait for the guest to power off (at most ``timeout`` s).  Returns the guest's log."""
        d = self.dir
        (d / "guest.log").unlink(missing_ok=True)
        (d / "job.sh").write_text(job)
        ubds = [f"ubd{n}={img}" for n, img in enumerate(self.images)]
        with open(d / "console.log", "wb") as console:
            p, token = _start_uml(
                ["linux.uml", f"mem={mem}", "rootfstype=hostfs", "rootflags=/", "rw", f"init={d / 'init.sh'}",
                 *ubds, "con=null", "con0=null"], console)
            try:
                if until is not None:
                    until(p)
                else:
                    _wait_exit(p, timeout)
            finally:
                # UML's block-device I/O runs in a process of its own (a clone
                # sharing memory, not a thread): the next boot must not start
                # while it could still be writing.
                _end_uml(p, token)
        return (d / "guest.log").read_text(errors="replace") if (d / "guest.log").exists() else ""

    def fsck(self, log: str) -> dict[int, tuple[int | None, str]]:
        """Per disk, the read-only check's exit status at the boot whose guest log
        this is (None: not run) and its output."""
        out: dict[int, tuple[int | None, str]] = {}
        for n in range(len(self.disks)):
            m = re.search(rf"^fsck {n} rc=(\d+)$", log, re.MULTILINE)
            path = self.dir / f"fsck{n}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            out[n] = (int(m.group(1)) if m else None, text)
        return out
