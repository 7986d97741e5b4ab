"""How convd runs qemu-img, and nothing about the daemon.

:mod:`.img` builds every qemu-img command line and runs it (limits, progress,
killing); :mod:`.launcher` is the daemon's client of the launcher process,
and :mod:`.launcher_process` the code that runs inside that process (it
starts each child with its limits already in force).  Nothing here imports
:mod:`convd.pipeline`, :mod:`convd.stages` or :mod:`convd.app`, and
:mod:`convd.config` only for type annotations (``tests/test_layering.py``).
"""
