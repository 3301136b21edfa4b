"""Operator faults while writing a store, as one line that names the cause and the fix.

A full disk, a read-only mount or a missing permission is not a bug: the writer stops, keeps what
is already stored (parts and versions are only ever added by atomic renames) and says what to do.
"""

from __future__ import annotations

import errno

from lopd.errors import LopdError

from .fs import StoreDir


class StoreUnwritable(LopdError):
    """The store cannot be written (no space, read-only, no permission); the message names the fix."""


_AGAIN = "then run the same command again: parts already written are kept and only the missing ones are scored"


def store_fault(err: OSError, store: StoreDir) -> StoreUnwritable | None:
    """The `StoreUnwritable` an `OSError` while writing `store` means, or None when it is no operator fault."""
    where = err.filename or store
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreUnwritable(
            f"no space left on the device holding {where} (disk or quota full); nothing already stored was changed. "
            f"Free space or move --store to a larger volume, {_AGAIN}"
        )
    if err.errno == errno.EROFS:
        return StoreUnwritable(
            f"{where} is on a read-only file system; nothing was written. Remount it read-write or choose a writable "
            f"--store, {_AGAIN}"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return StoreUnwritable(
            f"permission denied writing {where}; nothing already stored was changed. Give this user write access to "
            f"the store (chown/chmod) or choose another --store, {_AGAIN}"
        )
    return None
