"""Temporary files and staging folders that name their owner, and the sweep that removes dead owners' ones.

Records and cache entries are written under a temporary name and renamed into
place, so an interrupted write leaves no half result. A process killed with
SIGKILL still leaves its temporary file behind. Each temporary name therefore
carries its host and process id (`.tmp-<host>-<pid>-<random>`), and the next
start removes those whose process is gone. A folder shared between machines (a
cluster's filesystem) holds other hosts' names too: those are removed only once
they are older than `FOREIGN_AGE_S`, long past any write in progress.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

FOREIGN_AGE_S = 24 * 3600
_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")


def _host() -> str:
    return _UNSAFE.sub("_", socket.gethostname())[:40] or "host"


def temp_prefix(tag: str) -> str:
    """The prefix of a temporary name owned by this process, e.g. `.tmp-myhost-4242-`."""
    return f".{tag}-{_host()}-{os.getpid()}-"


def _owner(name: str, tag: str) -> tuple[str, int] | None:
    match = re.match(rf"^\.{re.escape(tag)}-([A-Za-z0-9_.]+)-(\d+)-", name)
    return (match.group(1), int(match.group(2))) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def is_abandoned(path: Path, tag: str, *, now: float | None = None) -> bool:
    """Whether `path` is a temporary name of `tag` whose writer can no longer finish it."""
    owner = _owner(path.name, tag)
    if owner is None:
        return False
    host, pid = owner
    if host == _host():
        return pid != os.getpid() and not _alive(pid)
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return False
    return age > FOREIGN_AGE_S


def sweep(folder: Path, tag: str, *, recursive: bool = False) -> list[Path]:
    """Remove the abandoned temporary files and folders of `tag` under `folder`; return what was removed.

    Only names this module made are considered: anything else is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{tag}-*"
    candidates = folder.rglob(pattern) if recursive else folder.glob(pattern)
    removed = []
    for path in sorted(candidates):
        if not is_abandoned(path, tag):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove the abandoned temporary %s: %s", path, exc)
            continue
        removed.append(path)
    if removed:
        log.info("removed %d abandoned temporary file(s) under %s", len(removed), folder)
    return removed
