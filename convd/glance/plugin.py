"""The ``convd`` import plugin: convd's daemon as the conversion step of Glance's image import.

Enabled in ``glance-image-import.conf``::

    [image_import_opts]
    image_import_plugins = ['convd']

    [convd]
    spool = /var/lib/convd
    timeout = 21600
    # optional: the layout each store wants (convd's [target.FMT] keys)
    target_layout = fast:qcow2.compression=zstd;qcow2.cluster_size=2MiB, thick:raw.preallocation=full

The task hands the staged image to the spool under the image ID, waits for
its record, and then hands the converted image on to the store upload (or
fails the import with ``convd: CODE: message``).  It speaks to the daemon
only through the spool (:mod:`convd.protocol`), so the two upgrade apart,
and it imports nothing Glance's environment lacks.
"""

import os
import time

from glance.common import exception
from glance.common.scripts import utils as script_utils
from oslo_config import cfg
from oslo_log import log as logging
from taskflow import task
from taskflow.patterns import linear_flow as lf

from convd import protocol

__all__ = ["get_flow", "list_opts", "parse_layout"]

LOG = logging.getLogger(__name__)
CONF = cfg.CONF

convd_opts = [
    cfg.StrOpt('spool',
               default='/var/lib/convd',
               help="""
The convd daemon's spool root ([spool] root in convd.toml): incoming/,
work/, outgoing/ and failed/ under it. Put it on the filesystem of Glance's
staging directory (os_glance_staging_store) so the hand-off is a rename.
"""),
    cfg.IntOpt('timeout',
               default=21600,
               min=1,
               help="""
Seconds an import waits for convd's record of its image. When it passes, the
item is cancelled in the spool and the import fails with "convd: timeout".
Allow for queueing, waiting for workspace and convert retries.
"""),
    cfg.FloatOpt('poll_interval',
                 default=2.0,
                 min=0.05,
                 help="""
Seconds between listings of outgoing/ and failed/ while waiting. inotify wakes
the task earlier where the spool is local; on NFS or CephFS this bounds how
late a record is noticed.
"""),
    cfg.FloatOpt('heartbeat_interval',
                 default=30.0,
                 min=0.1,
                 help="""
Seconds between updates of the import task's message with convd's progress.
Each update also keeps the task fresh, so Glance never takes its image lock
away (it does so from a task idle for an hour).
"""),
    cfg.StrOpt('priority',
               default='high',
               choices=[('high', 'taken before files dropped into the spool by hand'),
                        ('normal', 'taken in arrival order with every other file')],
               help="""
Where this Glance's imports stand in convd's queue. "high" marks each
hand-in (incoming/.convd-priority.IMAGE_ID) so the daemon takes it before
files dropped by hand, a user being the one who waits; convd still takes one
waiting dropped file after every [convert] priority_burst imports in a row,
so neither starves.
"""),
    cfg.DictOpt('target_layout',
                default={},
                help="""
The output layout each Glance store wants, where it wants one other than the
daemon's own [target.FMT] settings: STORE:FMT.KEY=VALUE[;FMT.KEY=VALUE...],
one entry per store, separated by commas. FMT.KEY is any key of convd's
[target.FMT] sections (raw.preallocation, qcow2.compat, qcow2.cluster_size,
qcow2.compression, qcow2.preallocation, vpc.subformat, vpc.size_multiple,
vmdk.subformat); the daemon applies the keys of the format it converts to
([convert] target_format) over its own and ignores the others. The store
"*" stands for every store without an entry of its own (and for a Glance
without enabled_backends). An import to several stores that want different
layouts fails; a layout convd's check-config would refuse fails the import
with "convd: unsupported_format: ..." naming the key. Example:
fast:qcow2.compression=zstd;qcow2.cluster_size=2MiB, thick:raw.preallocation=full
"""),
]

CONF.register_opts(convd_opts, group='convd')


def parse_layout(spec):
    """``FMT.KEY=VALUE[;FMT.KEY=VALUE...]`` as a layout request (:func:`convd.protocol.layout_request`).

    A value of digits only is a number (bytes, for the sizes); anything else
    stays text ("2MiB", "zstd").  Raises ``ValueError`` naming what is wrong.
    """
    out: dict[str, dict[str, int | str]] = {}
    for part in spec.split(';'):
        part = part.strip()
        if not part:
            continue
        lhs, eq, value = part.partition('=')
        fmt, dot, key = lhs.strip().partition('.')
        value = value.strip()
        if not (eq and dot and fmt and key and value):
            raise ValueError('%r is not FMT.KEY=VALUE' % part)
        out.setdefault(fmt, {})[key.strip()] = int(value) if value.isdigit() else value
    if not out:
        raise ValueError('it states no FMT.KEY=VALUE')
    return protocol.layout_request(out)

# qemu-img's format names (convd's records) as Glance's disk_format; a raw
# disk with a partition table is raw to Glance too.
# Looked up with a record's source format too, which may be absent (None).
DISK_FORMATS: dict[str | None, str] = {
    'raw': 'raw', 'gpt': 'raw', 'iso': 'iso', 'qcow2': 'qcow2', 'vmdk': 'vmdk',
    'vdi': 'vdi', 'vpc': 'vhd', 'vhdx': 'vhdx',
}
# How long a withdrawn item may take to reach failed/ when a daemon runs.
WITHDRAW_WAIT = 15.0


def list_opts():
    """The plugin's options, for oslo-config-generator (entry point ``oslo.config.opts``)."""
    return [('convd', convd_opts)]


def _progress_message(p):
    """``convd: convert 42% (qcow2 → raw)`` from :func:`convd.protocol.item_progress`."""
    if p is None:
        return 'convd: waiting for a daemon'
    stage = p.get('stage') or 'queued'
    text = 'convd: %s' % stage
    if stage == 'convert':
        text += ' %d%%' % int(p.get('progress', 0.0) * 100)
    elif stage == 'reserve':
        text += ' (waiting for space)'
    if p.get('source_format') and p.get('target_format'):
        text += ' (%s \u2192 %s)' % (p['source_format'], p['target_format'])
    return text


class _Withdrawn(Exception):
    pass


class _ConvdConvert(task.Task):

    default_provides = 'file_path'

    def __init__(self, task_id, task_type, task_repo, action_wrapper, stores, method=None):
        self.task_id = task_id
        self.task_type = task_type
        self.task_repo = task_repo
        self.action_wrapper = action_wrapper
        self.stores = stores
        # web-download and glance-download run a download task before this
        # one, whose own revert (after ours) puts the image back to queued and
        # marks the stores failed: doing it here too would make that revert
        # fail ("queued to queued") and leave the image locked.
        self.downloaded = method in ('web-download', 'glance-download')
        self.image_id = action_wrapper.image_id
        # What execute() changed, so revert() undoes exactly that.
        self.original = None     # (disk_format, container_format) before the import
        self.handed_in = None    # inode of the bytes in the spool, until they have a record
        self.staged = None       # the converted image this task handed on
        super().__init__(name='%s-ConvdConvert-%s' % (task_type, task_id))

    # -- execute ----------------------------------------------------------

    def execute(self, file_path, **kwargs):
        conf = CONF.convd
        paths = protocol.SpoolPaths.under(conf.spool)
        src = file_path[len('file://'):] if file_path.startswith('file://') else file_path
        name = self.image_id
        with self.action_wrapper as action:
            self.original = (action.image_disk_format, action.image_container_format)
            staged_size = action.image_size
        # What Glance knows of the staged data, for convd to check the bytes
        # it takes against (contract section 8): the size its staging upload
        # counted (glance-direct).  Glance holds no digest of staged data.
        expect: dict[str, int | str] | None = None
        if isinstance(staged_size, int) and staged_size > 0:
            expect = {'size': staged_size}
        layout = self._layout(conf)
        # A result under this image's ID that nobody took (an earlier import
        # whose glance-api died) is not this upload's: it would be mistaken
        # for it, and it would make this one a name_conflict.
        if {name, '%s.json' % name} & set(os.listdir(paths.outgoing)):
            LOG.warning('Removing an unclaimed convd result of an earlier import of image %s', name)
            self._discard_result(paths, name)
        try:
            self.handed_in = protocol.hand_in(src, paths, name, priority=conf.priority, expect=expect,
                                              layout=layout)
        except FileExistsError as exc:
            raise exception.UploadException(
                'convd: an image with this ID is already in the spool (incoming/%s)' % name) from exc
        except OSError as exc:
            LOG.error('Cannot hand image %s to convd at %s: %s', name, conf.spool, exc)
            raise exception.UploadException(
                'convd: cannot hand the image to the spool: %s' % (exc.strerror or exc)) from exc
        LOG.info('Image %(id)s handed to convd (spool %(spool)s)', {'id': name, 'spool': conf.spool})

        found = self._wait(paths, name, conf)
        if found is None:
            self._withdraw(paths, name, 'no record within %d s (Glance import task %s)'
                           % (conf.timeout, self.task_id))
            raise exception.UploadException(
                'convd: timeout: no result within %d s; the conversion was cancelled' % conf.timeout)
        where, rec = found
        self.handed_in = None
        if where == 'failed':
            err = rec.get('error') or {}
            LOG.warning('convd rejected image %s: %s', name, err)
            raise exception.UploadException('convd: %s: %s' % (err.get('code', 'unknown'),
                                                               err.get('message', '')))
        declared = self.original[0]
        detected = (rec.get('source') or {}).get('format')
        if DISK_FORMATS.get(detected, detected) != declared:
            self._discard_result(paths, name)
            raise exception.UploadException(
                'convd: format_mismatch: the image was declared %s but is %s'
                % (declared, DISK_FORMATS.get(detected, detected)))
        target = rec['target']
        self.staged = self._take_result(paths, name, src)
        with self.action_wrapper as action:
            action.set_image_attribute(disk_format=DISK_FORMATS.get(target['format'], target['format']),
                                       container_format='bare',
                                       virtual_size=target['virtual_size'],
                                       size=target['size'])
        LOG.info('convd converted image %(id)s: %(src)s to %(dst)s in %(secs).1f s',
                 {'id': name, 'src': detected, 'dst': target['format'],
                  'secs': (rec.get('timings') or {}).get('total', 0.0)})
        return 'file://%s' % self.staged

    def _layout(self, conf):
        """The layout request for the stores this import goes to ([convd] target_layout), or None."""
        table = conf.target_layout or {}
        if not table:
            return None
        specs = {store: table.get(store, table.get('*')) if store is not None else table.get('*')
                 for store in (self.stores or [None])}
        if len(set(specs.values())) > 1:
            raise exception.UploadException(
                'convd: the stores %s want different layouts ([convd] target_layout); import to one '
                'at a time' % ', '.join(sorted(str(s) for s in specs)))
        spec = next(iter(specs.values()))
        if not spec:
            return None
        try:
            return parse_layout(spec)
        except ValueError as exc:
            LOG.error('[convd] target_layout for %s: %s', ', '.join(str(s) for s in specs), exc)
            raise exception.UploadException(
                'convd: [convd] target_layout for store %s is not usable: %s'
                % (', '.join(str(s) for s in specs), exc)) from exc

    def _wait(self, paths, name, conf):
        """The record, or None after ``timeout``; heartbeats the task meanwhile."""
        deadline = time.monotonic() + conf.timeout
        # The first beat after one interval: a quick conversion costs no write.
        next_beat = time.monotonic() + conf.heartbeat_interval
        with protocol.DirWatch(paths.outgoing, paths.failed) as watch:
            while True:
                found = protocol.find_record(paths, name, self.handed_in)
                if found is not None:
                    return found
                now = time.monotonic()
                if now >= deadline:
                    return None
                if now >= next_beat:
                    try:
                        self._heartbeat(_progress_message(protocol.item_progress(paths, name)))
                    except exception.NotFound as exc:
                        # The image was deleted while convd worked on it: its
                        # conversion is of no use to anyone now.
                        self._withdraw(paths, name, 'image deleted during its import (Glance import task %s)'
                                       % self.task_id)
                        raise exception.UploadException(
                            'convd: cancelled: the image was deleted during its import') from exc
                    next_beat = now + conf.heartbeat_interval
                watch.wait(min(conf.poll_interval, next_beat - now, deadline - now))

    def _heartbeat(self, message):
        """Show convd's progress on the task; saving also keeps Glance's import lock ours."""
        self.action_wrapper.assert_task_lock()
        try:
            t = script_utils.get_task(self.task_repo, self.task_id)
            if t is None:
                raise exception.TaskNotFound(self.task_id)
            if t.status != 'processing':
                raise exception.TaskAbortedError()
            t.message = message
            self.task_repo.save(t)
        except (exception.TaskNotFound, exception.TaskAbortedError):
            raise
        except Exception as exc:  # noqa: BLE001 - a failed save costs one beat, not the import
            # A busy database (e.g. SQLite locked) costs one beat, not the import.
            LOG.warning('Import task %s: heartbeat not saved: %s', self.task_id, exc)

    def _take_result(self, paths, name, staging_path):
        """Consume ``outgoing/NAME``: record first, then the image becomes the staged data.

        A rename to the staging path where the staging directory shares the
        spool's filesystem (Glance then deletes it as usual), else the image
        is uploaded from ``outgoing/`` itself.
        """
        os.unlink(paths.outgoing / ('%s.json' % name))
        image = paths.outgoing / name
        try:
            os.rename(image, staging_path)
        except OSError:
            return str(image)
        return staging_path

    def _discard_result(self, paths, name):
        for leaf in ('%s.json' % name, name):
            try:
                os.unlink(paths.outgoing / leaf)
            except FileNotFoundError:
                pass

    def _withdraw(self, paths, name, reason):
        """Cancel the item in the spool; a result published meanwhile is thrown away."""
        inode, self.handed_in = self.handed_in, None
        try:
            protocol.request_cancel(paths, name, inode=inode, reason=reason)
        except OSError as exc:
            LOG.error('Cannot ask convd to cancel %s: %s', name, exc)
            return
        deadline = time.monotonic() + (WITHDRAW_WAIT if protocol.daemons_running(paths) else 0.0)
        with protocol.DirWatch(paths.outgoing, paths.failed) as watch:
            while True:
                found = protocol.find_record(paths, name, inode)
                if found is not None:
                    if found[0] == 'outgoing':
                        self._discard_result(paths, name)
                    protocol.clear_cancel_request(paths, name)
                    LOG.info('convd item %s withdrawn (%s)', name, found[0])
                    return
                if time.monotonic() >= deadline:
                    # No daemon now: the request stays, and the next one to
                    # start cancels the item before it could publish.
                    LOG.warning('convd item %s: cancel requested, no daemon answered yet', name)
                    return
                watch.wait(min(CONF.convd.poll_interval, deadline - time.monotonic()))

    # -- revert -----------------------------------------------------------

    def revert(self, result=None, **kwargs):
        paths = protocol.SpoolPaths.under(CONF.convd.spool)
        if self.handed_in is not None:
            self._withdraw(paths, self.image_id, 'Glance import task %s reverted' % self.task_id)
        if self.staged is not None:
            try:
                os.unlink(self.staged)
            except FileNotFoundError:
                pass
            self.staged = None
        try:
            with self.action_wrapper as action:
                # An image already active (a later task failed after the upload)
                # keeps its state, as Glance's own tasks leave it.
                if action.image_status == 'importing' and not self.downloaded:
                    action.set_image_attribute(status='queued')
                if self.original is not None and action.image_status in ('queued', 'importing'):
                    disk_format, container_format = self.original
                    action.set_image_attribute(disk_format=disk_format, container_format=container_format)
                if self.stores and not self.downloaded:
                    action.remove_importing_stores(self.stores)
                    action.add_failed_stores(self.stores)
        except exception.ImageNotFound:
            # Deleted while it imported: nothing is left to restore.
            LOG.info('Image %s was deleted during its import; nothing to restore', self.image_id)


def get_flow(**kwargs):
    """The plugin's flow: one task between staging and the store upload.

    :param task_id: the import task's ID
    :param task_type: the import task's type
    :param task_repo: Glance's task repository (for the heartbeat)
    :param action_wrapper: an ``ImportActionWrapper`` for the image
    :param backend: the stores being imported to
    """
    task_type = kwargs.get('task_type')
    return lf.Flow(task_type).add(
        _ConvdConvert(kwargs.get('task_id'), task_type, kwargs.get('task_repo'),
                      kwargs.get('action_wrapper'), kwargs.get('backend', []),
                      method=((kwargs.get('import_req') or {}).get('method') or {}).get('name')))
