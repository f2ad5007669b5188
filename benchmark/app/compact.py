"""Compact a folder of result records in place: each `X.json` becomes `X.json.xz`, atomically.

    python -m benchmark compact leaderboard/reference/results

A compacted record is the plain file's exact bytes as one xz stream (`xz -dk X.json.xz`
gives `X.json` back), a quarter of its size; every reader of records (the leaderboard,
`export`, the suite's resume, `reproduce`, `migrate`) reads both forms. Runs write plain
records; the committed reference folder is kept compacted so that it stays small.

Every record is read and checked as the leaderboard reads it before anything is
written: a file that is not a valid record stops the compaction with nothing
written. Then, per record, the compacted file is written beside the plain one
(temporary name, fsync, link), read back and compared byte for byte, the folder
is synced, and only then is the plain file removed. A crash at any point leaves
the record whole, at worst in both forms, which readers read once (`record_files`)
and a second run finishes. A second run over a compacted folder changes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.pipeline.records import (
    RecordError,
    ResultRecord,
    compact_name,
    compress,
    decompress,
    is_compact,
    parse_json,
    read_file,
    read_record_bytes,
    record_files,
    write_atomically,
)


@dataclass
class CompactReport:
    """What `compact` did: the files it wrote, those already compact, and the folder's record bytes."""

    compacted: list[Path] = field(default_factory=list)
    already_compact: list[Path] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0


def compact(folder: Path) -> CompactReport:
    """Rewrite every plain record under `folder` as a compacted one; all are checked before any is written.

    Raises:
        RecordError: `folder` is not a folder, a file is not a valid record (nothing
            written), or a compacted file does not read back as its plain one (that
            plain file is kept).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RecordError(f"{folder} is not a folder of result records")
    report = CompactReport()
    # Only the compressed bytes are held (16 KB a record): the plain ones are read again to compare.
    pending: list[tuple[Path, bytes]] = []
    for path in record_files(folder):
        try:
            stored = read_file(path)
            raw = decompress(stored, source=str(path)) if is_compact(path) else stored
            ResultRecord.from_dict(parse_json(raw, source=str(path)), source=str(path))
        except RecordError as exc:
            raise RecordError(f"{exc}; nothing was written") from None
        report.bytes_before += len(stored)
        if is_compact(path):
            report.already_compact.append(path)
            report.bytes_after += len(stored)
            continue
        packed = compress(raw)
        if decompress(packed, source=str(path)) != raw:
            raise RecordError(f"{path}: does not decompress to itself; nothing was written")
        pending.append((path, packed))
    for path, packed in pending:
        target = compact_name(path)
        # An interrupted run may have left the compacted file already: it is checked like a new one.
        if not target.exists():
            write_atomically(target, packed)
        if read_record_bytes(target) != read_file(path):
            raise RecordError(f"{target}: does not read back as {path.name}; both are kept, remove the wrong one")
        try:
            _sync_folder(target.parent)
            path.unlink()
            report.bytes_after += target.stat().st_size
        except OSError as exc:
            raise RecordError(f"cannot compact {path}: {exc.strerror or exc}; {target} holds the same record") from None
        report.compacted.append(target)
    return report


def _sync_folder(folder: Path) -> None:
    """Make the new file's name durable before the plain file's removal can be."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
