"""Staging folders: where an upload (or a file the API reads back from storage) lies before it is stored.

Layout: ``<data_dir>/tmp/<purpose>-<8 random characters>/``, one folder per request, removed when the request
ends. A server killed mid-request (SIGKILL, the OOM killer) leaves its folder behind, half-written; the sweep
removes such folders at start-up and on every reconciler pass.

A request holds an exclusive ``flock`` on its folder while it uses it; the kernel drops the lock when the
process dies, however it dies. The sweep removes a folder only when all of these hold:

- its name follows the scheme above (nothing else in ``tmp/`` is touched);
- nothing in it changed for ``older_than`` seconds (``ALIGND_STAGING_SWEEP_AFTER_SECONDS``): a guard that
  holds even where locks are not shared, such as two hosts on a network filesystem without lock support;
- it is not in this process's registry of folders in use, and the sweep can take its lock: no request of
  this process or of another one sharing the data directory is using it. The sweep keeps the lock while it
  removes the folder, and a request checks after locking that its folder still exists, so a sweep that
  slips in between a folder's creation and its lock cannot pull it from under the request.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_DIRNAME = "tmp"
_PURPOSE = re.compile(r"^[a-z]+$")
# tempfile.mkdtemp appends 8 characters of this alphabet to the prefix.
_FOLDER_NAME = re.compile(r"^[a-z]+-[a-z0-9_]{8}$")

# Folders in use by this process -> the descriptor that holds their lock.
_in_use: dict[Path, int] = {}
_in_use_lock = threading.Lock()


def staging_root(data_dir: Path) -> Path:
    return data_dir / STAGING_DIRNAME


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _same_folder(path: Path, fd: int) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def open_staging(data_dir: Path, purpose: str) -> Path:
    """A new, empty staging folder for one request, locked until :func:`release_staging`."""
    if not _PURPOSE.match(purpose):
        raise ValueError(f"staging purpose must be lowercase letters, got {purpose!r}")
    root = staging_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        folder = Path(tempfile.mkdtemp(prefix=f"{purpose}-", dir=root))
        # A sweep may take the new folder before this request locks it: then try again with a new one.
        try:
            fd = _open_dir(folder)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while such a sweep is removing it
        if _same_folder(folder, fd):
            with _in_use_lock:
                _in_use[folder] = fd
            return folder
        os.close(fd)


def release_staging(folder: Path) -> None:
    """Remove a folder from :func:`open_staging`, then drop its lock (never a half-removed folder unlocked
    while this process lives; what a failed removal leaves is swept later)."""
    shutil.rmtree(folder, ignore_errors=True)
    with _in_use_lock:
        fd = _in_use.pop(folder, None)
    if fd is not None:
        os.close(fd)


def _last_change(folder: Path) -> float:
    """The newest modification time of the folder and everything in it."""
    newest = folder.stat().st_mtime
    for parent, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):  # removed meanwhile
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
    return newest


def _remove_unless_in_use(folder: Path) -> bool:
    with _in_use_lock:
        if folder in _in_use:
            return False
    try:
        fd = _open_dir(folder)
    except OSError:  # removed meanwhile, or not a folder we may open
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a request (of any process) holds it
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return not folder.exists()
    finally:
        os.close(fd)


def sweep_staging(data_dir: Path, *, older_than: float) -> list[str]:
    """Remove the staging folders no request is using and nothing changed in for ``older_than`` seconds.

    Returns the names removed. Never raises for a folder it cannot inspect or remove (space, not
    correctness): that folder stays for the next sweep.
    """
    try:
        entries = list(os.scandir(staging_root(data_dir)))
    except FileNotFoundError:
        return []
    cutoff = time.time() - older_than
    removed: list[str] = []
    for entry in entries:
        if not _FOLDER_NAME.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        try:
            if _last_change(folder) > cutoff:
                continue
        except OSError:
            continue
        if _remove_unless_in_use(folder):
            removed.append(entry.name)
    if removed:
        log.info("removed %d abandoned staging folder(s): %s", len(removed), ", ".join(removed))
    return removed
