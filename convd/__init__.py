"""convd: a safe, crash-proof disk image conversion daemon around qemu-img."""

__all__ = ["__version__"]

__version__ = "0.1.0"
