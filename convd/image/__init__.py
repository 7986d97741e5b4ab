"""Everything convd knows about disk image formats and containers, and nothing about the daemon.

One module per format (:mod:`.qcow2`, :mod:`.vmdk`, :mod:`.vdi`, :mod:`.vpc`,
:mod:`.vhdx`) and per container concern (:mod:`.containers`); the gate is
:mod:`.inspection`.  Nothing here imports :mod:`convd.config`,
:mod:`convd.pipeline` or :mod:`convd.stages` (``tests/test_layering.py``
checks it).
"""
