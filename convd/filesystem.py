"""What the spool's filesystem is and can do, learnt once at start-up.

The type comes from ``statfs(2)``'s ``f_type`` magic (linux/magic.h) and, for
FUSE, the mount's subtype in ``/proc/self/mountinfo`` (``fuse.glusterfs``,
``fuse.ceph-fuse``).  On a shared filesystem inotify never reports another
client's changes and a read lease sees only this host's openers, so the
daemon polls there and treats its writer check as a hint.  The traits
(sparse files, O_DIRECT) come from a probe file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Filesystem", "FsTraits", "classify", "detect_type", "probe_filesystem"]


@dataclass(frozen=True)
class FsTraits:
    sparse: bool  # keeps holes
    block_size: int  # bytes, statvfs f_bsize
    direct_io: bool  # O_DIRECT works (not on tmpfs, some network filesystems)


def probe_filesystem(directory: Path) -> FsTraits:
    """Probe ``directory``'s filesystem with a 64 MiB sparse temp file (removed after)."""
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe.", suffix=".tmp") as fh:
        fh.truncate(64 << 20)
        fh.flush()
        sparse = os.fstat(fh.fileno()).st_blocks * 512 < (1 << 20)
        try:
            os.close(os.open(fh.name, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC))
            direct = True
        except OSError:
            direct = False
    if direct and detect_type(directory).fuse:
        # Through FUSE (ceph-fuse measured), an O_DIRECT write leaves stale
        # pages in the writer's own page cache: qemu-img compare and the
        # checksum, reading through the same mount, saw zeros where the
        # data was.  Buffered writes are coherent.
        direct = False
    return FsTraits(sparse=sparse, block_size=os.statvfs(directory).f_bsize, direct_io=direct)


_FUSE_MAGIC = 0x65735546
# f_type values from linux/magic.h (and fs/smb, fs/ceph for the ones it lacks).
_MAGIC: dict[int, tuple[str, bool]] = {
    0x6969: ("nfs", True),
    0x00C36400: ("cephfs", True),
    0x517B: ("smb", True),
    0xFF534D42: ("smb", True),  # CIFS_SUPER_MAGIC
    0xFE534D42: ("smb", True),  # SMB2_SUPER_MAGIC
    0x564C: ("ncp", True),
    0x5346414F: ("afs", True),
    0x6B414653: ("afs", True),  # kAFS
    0x73757245: ("coda", True),
    0x01021997: ("9p", True),
    0x0BD00BD0: ("lustre", True),
    0x01161970: ("gfs2", True),
    0x7461636F: ("ocfs2", True),
    0x47504653: ("gpfs", True),
    _FUSE_MAGIC: ("fuse", True),  # refined by the mount's subtype below
    0xEF53: ("ext4", False),
    0x58465342: ("xfs", False),
    0x9123683E: ("btrfs", False),
    0x01021994: ("tmpfs", False),
    0x794C7630: ("overlay", False),
    0x2FC12FC1: ("zfs", False),
    0xF2F52010: ("f2fs", False),
}

# FUSE subtypes (mountinfo "fuse.<subtype>") known to be network filesystems.
_FUSE_SHARED = {
    "glusterfs": "glusterfs", "ceph-fuse": "cephfs", "ceph": "cephfs", "sshfs": "sshfs",
    "s3fs": "s3fs", "gcsfuse": "gcsfuse", "beegfs": "beegfs", "moosefs": "moosefs",
    "mfs": "moosefs", "lizardfs": "lizardfs", "juicefs": "juicefs", "rclone": "rclone",
}
# FUSE subtypes that only ever show this host's own files.
_FUSE_LOCAL = {"fuse-overlayfs": "fuse-overlayfs", "lxcfs": "lxcfs", "bindfs": "bindfs"}


@dataclass(frozen=True)
class Filesystem:
    """``kind`` is a short name (``nfs``, ``cephfs``, ``glusterfs``, ``smb``,
    ``fuse``, ``ext4``, …); ``fstype`` is the mount's type as mountinfo
    spells it (``fuse.ceph-fuse``), or ``""`` when unknown; ``shared`` says
    that other hosts may change it behind this kernel's back (unknown FUSE
    filesystems count as shared: polling is always correct there)."""

    kind: str
    fstype: str
    shared: bool
    magic: int

    @property
    def fuse(self) -> bool:
        """Served by a user-space process through FUSE."""
        return self.magic == _FUSE_MAGIC or self.fstype.startswith("fuse")

    def __str__(self) -> str:
        return self.fstype if self.fstype and self.fstype != self.kind else self.kind


class _Statfs(ctypes.Structure):
    # f_type is the first member (__fsword_t, a C long) on every Linux ABI;
    # the rest of struct statfs is padding we never read.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def _statfs_magic(path: Path) -> int:
    """``statfs(2)``'s f_type for ``path``; raises OSError."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return buf.f_type & 0xFFFFFFFF


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mount_fstype(path: Path, mountinfo: str) -> str:
    """The fstype of the mount that holds ``path`` (the last, deepest match)."""
    target = os.path.realpath(path)
    best, best_len = "", -1
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields = pre.split()
        if not sep or len(fields) < 5:
            continue
        mnt = _unescape(fields[4])
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= best_len:  # later lines over-mount earlier ones
            best, best_len = post.split()[0], len(mnt)
    return best


def classify(magic: int, fstype: str = "") -> Filesystem:
    """Classify a filesystem from its statfs magic and mountinfo fstype."""
    kind, shared = _MAGIC.get(magic, ("", False))
    if kind == "fuse" or fstype.startswith("fuse."):
        sub = fstype.partition(".")[2]
        if sub in _FUSE_LOCAL:
            return Filesystem(_FUSE_LOCAL[sub], fstype, False, magic)
        return Filesystem(_FUSE_SHARED.get(sub, "fuse"), fstype, True, magic)
    if not kind:
        # Not in our table: trust mountinfo's name, and assume local (the
        # operator can still force polling in the config).
        base = fstype.split(".")[0]
        kind, shared = {"nfs4": ("nfs", True), "nfs": ("nfs", True), "ceph": ("cephfs", True),
                        "cifs": ("smb", True), "smb3": ("smb", True),
                        "glusterfs": ("glusterfs", True)}.get(base, (base or "unknown", False))
    return Filesystem(kind, fstype, shared, magic)


def detect_type(path: Path, mountinfo: str | None = None) -> Filesystem:
    """The filesystem holding ``path`` (which must exist).

    ``mountinfo`` is the text of ``/proc/self/mountinfo`` (read when None;
    an unreadable one just leaves FUSE subtypes unknown).  Raises OSError
    when ``path`` cannot be statfs'ed.
    """
    magic = _statfs_magic(path)
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
                mountinfo = fh.read()
        except OSError:
            mountinfo = ""
    return classify(magic, _mount_fstype(path, mountinfo))
