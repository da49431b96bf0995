"""Open HDF5 files with one locking setting for the whole process, and clear errors.

File locking fails on some network filesystems (NFS, Lustre) with errno 37 or 11. Set
`HDF5_USE_FILE_LOCKING=FALSE` (HDF5's own variable) or `GRADDYN_HDF5_LOCKING=0` to open
every file without locking; the same setting is used for every handle, so reopening a
file in one process never mixes locking flags.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py

_LOCK_ERRNOS = {errno.ENOLCK, errno.EAGAIN}


def locking_enabled() -> bool:
    """False when the environment asks for HDF5 files to be opened without locking."""
    if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE":
        return False
    return os.environ.get("GRADDYN_HDF5_LOCKING", "1").lower() not in ("0", "false", "no")


def open_h5(path: str | Path, mode: str = "r") -> h5py.File:
    """`h5py.File(path, mode)` with the process-wide locking setting."""
    try:
        return h5py.File(path, mode, locking=locking_enabled())
    except OSError as error:
        if error.errno in _LOCK_ERRNOS or "unable to lock file" in str(error):
            raise OSError(
                error.errno,
                f"{path}: cannot lock the HDF5 file ({error}); on NFS or Lustre set "
                "HDF5_USE_FILE_LOCKING=FALSE or GRADDYN_HDF5_LOCKING=0",
            ) from error
        raise
