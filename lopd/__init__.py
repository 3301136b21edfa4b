"""lightning-opd: teacher log-prob store, API and client for offline on-policy distillation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lightning-opd")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
