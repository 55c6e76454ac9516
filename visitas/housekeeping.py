"""The local folders of past run dates, removed once nothing in them is needed.

A file's folders are emptied when ArchiveZip finishes it, but a run date's folders themselves stay
(its ArchiveZip markers, the files left to another host or a later run), and so does everything of
a file whose chain stopped on one date and that a later date's run took from the source instead:
its download and checked batches, as large as the file, kept forever.  ``[paths] keep_state_days``
bounds that: at the start of each run, the download and state folders of run dates more than that
many days before today are removed, unless:

- it is the run's own date (a backfill of an old date keeps its folders while it runs);
- anything in them changed within those days (a run of that date may be under way);
- a download in it holds content that ``load_log`` does not record as archived: it may be the only
  copy left (the partner may have deleted the file at the source since); the whole date stays and
  a warning names the file, and so does the run mail, for the operator to load it
  (``visitas run --date``) or remove it.

A folder is renamed to a hidden name before it is deleted, so a crash part-way leaves no half
date behind for Luigi to read as done: the leftover is deleted by the next call.  (The run mail's
records, ``runs/*.jsonl``, are pruned by :func:`visitas.ops.runmail.prune_failure_files`.)
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from visitas.paths import RunPaths
from visitas.transform.reading import sha256_of

log = logging.getLogger(__name__)

_DAY = re.compile(r"^(\d{8})$")
_PRUNING = re.compile(r"^\.(\d{8})\.pruning$")


def prune_local(download_root: Path, state_root: Path, keep_days: int, today: dt.date,
                current: dt.date, archived: Callable[[str], bool],
                kept: Callable[[Path, dt.date], None] = lambda path, day: None,
                now: float | None = None) -> list[dt.date]:
    """Remove the folders of run dates more than ``keep_days`` before ``today`` (see the module);
    ``archived(sha256)`` says whether ``load_log`` records that content as archived;
    ``kept(path, day)`` is told of each download that keeps its date.  Returns the dates
    removed."""
    pruned: list[dt.date] = []
    if keep_days <= 0:
        return pruned
    now = time.time() if now is None else now
    since = now - keep_days * 86400
    oldest = today - dt.timedelta(days=keep_days)
    for root in (download_root, state_root):
        _finish_interrupted(root)
    for day in sorted(_days(download_root) | _days(state_root)):
        if day >= oldest or day == current:
            continue
        folders = [root / f"{day:%Y%m%d}" for root in (download_root, state_root)]
        if _newest_change(folders) >= since:
            continue
        unarchived = [path for path in _downloads(folders[0]) if not archived(sha256_of(path))]
        if unarchived:
            log.warning("run date %s: %s never archived, so its folders stay: load it with"
                        " `visitas run --date %s`, or remove it once it is safe elsewhere",
                        day, ", ".join(str(p) for p in unarchived), day)
            for path in unarchived:
                kept(path, day)
            continue
        for folder in folders:
            _remove(folder)
        pruned.append(day)
    if pruned:
        log.info("removed the local folders of %d past run date(s) (%s): older than %d days"
                 " ([paths] keep_state_days)", len(pruned), ", ".join(map(str, pruned)), keep_days)
    return pruned


def _days(root: Path) -> set[dt.date]:
    days: set[dt.date] = set()
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return days
    for entry in entries:
        found = _DAY.match(entry.name)
        if found and entry.is_dir(follow_symlinks=False):
            try:
                days.add(dt.datetime.strptime(found.group(1), "%Y%m%d").date())
            except ValueError:
                continue
    return days


def _walk(folder: Path) -> Iterator[os.DirEntry]:
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        yield entry
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))


def _newest_change(folders: list[Path]) -> float:
    """The latest modification time of the folders and of anything in them (0 if none)."""
    newest = 0.0
    for folder in folders:
        try:
            newest = max(newest, folder.lstat().st_mtime)
        except FileNotFoundError:
            continue
        for entry in _walk(folder):
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _downloads(folder: Path) -> list[Path]:
    """The complete downloads of a date (a partial one, under its temporary name, is not a copy
    of anything)."""
    try:
        return sorted(Path(e.path) for e in os.scandir(folder)
                      if e.is_file(follow_symlinks=False) and RunPaths.is_download(e.name))
    except FileNotFoundError:
        return []


def _remove(folder: Path) -> None:
    hidden = folder.with_name(f".{folder.name}.pruning")
    try:
        folder.rename(hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden)


def _finish_interrupted(root: Path) -> None:
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return
    for entry in entries:
        if _PRUNING.match(entry.name) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)

