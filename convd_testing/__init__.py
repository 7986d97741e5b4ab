"""The harness the tests and the benchmark share (not part of the convd package).

:mod:`.daemon` runs real ``convd run`` subprocesses on real spools;
:mod:`.glance_server` a real Glance (with its MariaDB) and
:mod:`.sharedfs` a real Ceph cluster and NFS inside User-Mode Linux.  The
tests import it through pytest's ``pythonpath`` (pyproject.toml), the
benchmark as ``python -m bench`` from the repository, which puts the
repository first on ``sys.path``: no ``sys.path`` edits.
"""
