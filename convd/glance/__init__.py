"""Glance integration: the ``convd`` image import plugin (see :mod:`convd.glance.plugin`)."""
