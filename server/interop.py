"""Moved to `lopd.storage.interop` (the reference Lightning-OPD layout is a storage format).

Kept only so that `lopd.cli.store` keeps importing until it imports from `lopd.storage.interop`;
delete this module then.
"""

from __future__ import annotations

from lopd.storage.interop import (
    FORMAT_NAME,
    IMPORT_BACKEND,
    UNKNOWN,
    export_lightning_opd,
    import_lightning_opd,
    lightning_opd_schema,
)

__all__ = [
    "FORMAT_NAME",
    "IMPORT_BACKEND",
    "UNKNOWN",
    "export_lightning_opd",
    "import_lightning_opd",
    "lightning_opd_schema",
]
