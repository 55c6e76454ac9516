"""The dated backup zips: files go in whole and verified before anything is deleted at the source.

``backup_dir/visitas_YYYYMMDD.zip`` collects the files handled on that run date: loaded files at the
top, ``rejected/`` and ``duplicate/`` ones in folders.  It takes at most ``PART_MEMBERS`` files;
the day's next files go into ``visitas_YYYYMMDD_2.zip``, then ``_3``, and so on (``load_log``
records each file's zip and member).

A file is first deflated on its own (:func:`precompress`; LoadPostgres does it in a thread while
the database works) with ISA-L, about three times faster than zlib at the same ratio, and the
stream is inflated again and checked against the loaded file's sha256.  A zip is made with its
first file (a temporary name, fsync, rename).  Each later file is appended in place: its bytes go
where the zip's central directory began, and a new central directory follows.  That directory
lists every member of the zip, which is why a zip takes at most ``PART_MEMBERS`` of them: adding a
file writes that file and a bounded directory, whatever the day's number of files (copying the
zip for each file, and later rewriting one directory of all the day's members, made a day's
archive cost grow with the square of its files).  Before that, a journal beside the zip records
the zip's length and the bytes of its old central directory (fsync'd, renamed into place); the
zip is fsync'd, the member's stored bytes, CRC and sizes are read back and compared with the
checked stream, and only then is the journal removed.  A crash at any point therefore leaves the
old zip (put back from the journal by the next call) or the new one, complete; existing members'
bytes are never written again, and a second run on the same day adds to the day's last zip
instead of overwriting it.  The zips are standard ones (deflate), readable by any unzip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from isal import isal_zlib

log = logging.getLogger(__name__)

_READ = 1024 * 1024
ZIP_LEVELS = range(0, 4)  # ISA-L's deflate levels


class ArchiveError(Exception):
    """The archive could not be written or verified: nothing may be deleted at the source."""


# Members per zip.  Each append rewrites the zip's central directory (59 bytes per member named
# report_NN.txt, and as much again in the journal) and parses it twice.  Measured, appends of a
# 130 KiB file: 2.4 ms into a zip of up to 99 members, 8.8 ms into one of 900-999; with zips of
# 100 members, 2.5 ms for the 900th file of the day as for the first.
PART_MEMBERS = 100


def zip_name(run_date: dt.date, part: int = 1) -> str:
    """The name of the run date's ``part``-th zip (the first has no number)."""
    return f"visitas_{run_date:%Y%m%d}{'' if part == 1 else f'_{part}'}.zip"


_ZIP_NAME = re.compile(r"^visitas_(\d{8})(?:_([2-9]|[1-9]\d+))?\.zip$")


def day_zips(backup_dir: Path, run_date: dt.date) -> list[tuple[int, Path]]:
    """The run date's zips with their part numbers, in the order they were made."""
    parts = []
    for path in backup_dir.glob(f"visitas_{run_date:%Y%m%d}*.zip"):
        found = _ZIP_NAME.match(path.name)
        if found and found.group(1) == f"{run_date:%Y%m%d}":
            parts.append((int(found.group(2) or 1), path))
    return sorted(parts)


def prune_backups(backup_dir: Path, keep_days: int, today: dt.date, current: dt.date) -> list[Path]:
    """Delete the zips (with their lock files) of run dates more than ``keep_days`` before
    ``today``, never the ``current`` run date's; returns what was deleted.  Only names this
    module makes are touched; a day whose zips are being appended to is left for the next call."""
    if keep_days <= 0 or not backup_dir.is_dir():
        return []
    oldest = today - dt.timedelta(days=keep_days)
    days: dict[dt.date, list[Path]] = {}
    for path in sorted(backup_dir.iterdir()):
        found = _ZIP_NAME.match(path.name)
        if not found:
            continue
        try:
            day = dt.datetime.strptime(found.group(1), "%Y%m%d").date()
        except ValueError:
            continue
        if day < oldest and day != current:
            days.setdefault(day, []).append(path)
    deleted = []
    for day, paths in sorted(days.items()):
        lock = backup_dir / f".{zip_name(day)}.lock"
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a worker is appending to them (a backfill of that date)
            if any(_journal_of(path).exists() for path in paths):
                continue  # an interrupted append: the next add_to_archive call repairs it first
            for path in paths:
                path.unlink()
            lock.unlink(missing_ok=True)
            deleted.extend(paths)
    if deleted:
        log.info("deleted %d backup zip(s) older than %d days ([paths] keep_backups_days): %s",
                 len(deleted), keep_days, ", ".join(p.name for p in deleted))
    return deleted


def member_sha256(archive: zipfile.ZipFile, member: str) -> str:
    digest = hashlib.sha256()
    with archive.open(member) as handle:  # also checks the CRC
        for chunk in iter(lambda: handle.read(_READ), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One writer per zip on this host (several Luigi workers may archive at once)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Deflated:
    """A file deflated ahead of the archive step (a raw deflate stream) and checked."""

    path: Path
    sha256: str          # of the content: the loaded file
    stream_sha256: str   # of the compressed bytes, as checked
    crc: int
    file_size: int
    compress_size: int
    mtime: float
    mode: int

    @staticmethod
    def record_of(path: Path) -> Path:
        return path.with_name(path.name + ".json")

    def save(self) -> None:
        record = self.record_of(self.path)
        partial = record.with_name(record.name + ".partial")
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}
        partial.write_text(json.dumps(data))
        os.replace(partial, record)

    @classmethod
    def load(cls, path: Path) -> Deflated | None:
        """The checked stream at ``path``, or None if there is none (or it looks wrong)."""
        try:
            data = json.loads(cls.record_of(path).read_text())
            deflated = cls(path=path, **data)
            if path.stat().st_size != deflated.compress_size:
                return None
        except (OSError, ValueError, TypeError):
            return None
        return deflated


def precompress(source: Path, target: Path, level: int, sha256: str) -> Deflated:
    """Deflate ``source`` into the raw stream ``target`` and check it inflates to ``sha256``.

    ``target`` and its record (``target.json``) appear only once the check has passed.
    """
    if level not in ZIP_LEVELS:
        raise ValueError(f"zip level {level} is not one of ISA-L's deflate levels 0-3")
    Deflated.record_of(target).unlink(missing_ok=True)
    partial = target.with_name(target.name + ".partial")
    info = source.stat()
    compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
    crc, size, stream = 0, 0, hashlib.sha256()
    with open(source, "rb") as reader, open(partial, "wb") as writer:
        for chunk in iter(lambda: reader.read(_READ), b""):
            crc = isal_zlib.crc32(chunk, crc)
            size += len(chunk)
            packed = compressor.compress(chunk)
            stream.update(packed)
            writer.write(packed)
        packed = compressor.flush()
        stream.update(packed)
        writer.write(packed)
    deflated = Deflated(target, sha256, stream.hexdigest(), crc, size, partial.stat().st_size,
                        info.st_mtime, info.st_mode)
    try:
        _check_stream(partial, deflated)
    except ArchiveError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    deflated.save()
    return deflated


def _check_stream(path: Path, deflated: Deflated) -> None:
    """Inflate the stream again: it must give the expected content, whole.

    At most ``_READ`` bytes are inflated at a time: a file of zeros deflates a thousandfold.
    """
    inflater = isal_zlib.decompressobj(-15)
    digest, crc, size = hashlib.sha256(), 0, 0
    with open(path, "rb") as reader:
        for chunk in iter(lambda: reader.read(_READ), b""):
            while chunk:
                plain = inflater.decompress(chunk, _READ)
                digest.update(plain)
                crc = isal_zlib.crc32(plain, crc)
                size += len(plain)
                chunk = inflater.unconsumed_tail
    plain = inflater.flush()
    digest.update(plain)
    crc, size = isal_zlib.crc32(plain, crc), size + len(plain)
    if not inflater.eof or digest.hexdigest() != deflated.sha256 or (crc, size) != (
            deflated.crc, deflated.file_size):
        raise ArchiveError(f"{path.name} inflates to sha256 {digest.hexdigest()[:12]}…"
                           f" ({size} bytes), expected {deflated.sha256[:12]}…")


def _data_offset(handle, info: zipfile.ZipInfo) -> int:
    """Where a member's compressed bytes start (after its local header)."""
    handle.seek(info.header_offset)
    header = handle.read(30)
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


def _stored_sha256(path: Path, info: zipfile.ZipInfo) -> str:
    """sha256 of a member's compressed bytes as stored."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(_data_offset(handle, info))
        remaining = info.compress_size
        while remaining:
            chunk = handle.read(min(_READ, remaining))
            if not chunk:
                raise ArchiveError(f"{path.name} is truncated")
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _append_deflated(archive: zipfile.ZipFile, deflated: Deflated, member: str) -> None:
    """Write the checked stream into ``archive`` as ``member`` (a deflated entry)."""
    entry = zipfile.ZipInfo(member, date_time=time.localtime(deflated.mtime)[:6])
    entry.compress_type = zipfile.ZIP_DEFLATED
    entry.CRC, entry.file_size = deflated.crc, deflated.file_size
    entry.compress_size = deflated.compress_size
    entry.external_attr = (deflated.mode & 0xFFFF) << 16
    zip64 = max(entry.file_size, entry.compress_size) > zipfile.ZIP64_LIMIT
    out = archive.fp
    if out is None:
        raise ArchiveError(f"{member}: the zip is not open for writing")
    out.seek(archive.start_dir)
    entry.header_offset = out.tell()
    out.write(entry.FileHeader(zip64))
    with open(deflated.path, "rb") as stream:
        shutil.copyfileobj(stream, out, _READ)
    archive.start_dir = out.tell()
    archive.filelist.append(entry)
    archive.NameToInfo[member] = entry
    # zipfile's private flag: write the central directory on close (covered by unit tests).
    setattr(archive, "_didModify", True)  # noqa: B010


def _verify_copied(partial: Path, member: str, deflated: Deflated) -> None:
    """The member as stored in ``partial`` has the checked stream's bytes, CRC and sizes."""
    with zipfile.ZipFile(partial) as archive:
        copied = archive.getinfo(member)
    if ((copied.CRC, copied.file_size, copied.compress_size, copied.compress_type)
            != (deflated.crc, deflated.file_size, deflated.compress_size, zipfile.ZIP_DEFLATED)
            or _stored_sha256(partial, copied) != deflated.stream_sha256):
        raise ArchiveError(f"{member} in {partial.name} does not read back as the checked"
                           f" deflated copy of the file")


def _journal_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.journal")


def _write_journal(target: Path, start_dir: int) -> None:
    """Record what an append overwrites: the zip's length and its bytes from ``start_dir`` on
    (the central directory and its end records: small)."""
    length = target.stat().st_size
    with open(target, "rb") as handle:
        handle.seek(start_dir)
        tail = handle.read()
    if start_dir + len(tail) != length:
        raise ArchiveError(f"{target.name}: cannot read its central directory whole")
    journal = _journal_of(target)
    partial = journal.with_name(journal.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(length.to_bytes(8, "big") + start_dir.to_bytes(8, "big") + tail)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, journal)
    _fsync(target.parent)


def _restore(target: Path) -> None:
    """Put the zip back as it was before an append that did not finish (if a journal says so)."""
    journal = _journal_of(target)
    if not journal.exists():
        return
    data = journal.read_bytes()
    length, start_dir = int.from_bytes(data[:8], "big"), int.from_bytes(data[8:16], "big")
    with open(target, "r+b") as handle:
        handle.truncate(start_dir)
        handle.seek(start_dir)
        handle.write(data[16:])
        handle.truncate(length)
        handle.flush()
        os.fsync(handle.fileno())
    journal.unlink()
    _fsync(target.parent)
    log.warning("%s: an append that did not finish was undone (the zip is as it was)", target.name)


def _stored(archive: zipfile.ZipFile, names: set[str], member: str, sha256: str) -> str | None:
    """The name under which ``archive`` holds this content as ``member``, if it does."""
    for name in (member, f"{member}.{sha256[:8]}"):
        if name in names and member_sha256(archive, name) == sha256:
            return name
    return None


def _append_in_place(target: Path, deflated: Deflated, member: str, sha256: str,
                     limit: int) -> tuple[str, int] | None:
    """Add ``member`` to the zip at ``target`` unless it is there with this content; returns its
    name in the zip (``member.<sha8>`` when another content has the name) and the bytes written
    (0: it was there), or None if it is not there and the zip has ``limit`` members already.

    The zip's central directory is read once for the check and the append (each read parses
    every member's entry).  The journal first; then the member and a new central directory,
    fsync, read back; the journal goes only once the new zip checks out, and the old zip is put
    back if anything fails."""
    with zipfile.ZipFile(target, "a") as archive:
        names = set(archive.namelist())
        stored = _stored(archive, names, member, sha256)
        if stored is not None:
            return stored, 0
        if len(names) >= limit:
            return None
        if member in names:
            member = f"{member}.{sha256[:8]}"
        start_dir = archive.start_dir
        _write_journal(target, start_dir)
        try:
            _append_deflated(archive, deflated, member)
            archive.close()  # writes the new central directory
            _fsync(target)
            _verify_copied(target, member, deflated)
        except BaseException:
            # Closed before the old zip is put back (leaving the with block would write a
            # directory over it), and without writing one (zipfile's private flag again).
            setattr(archive, "_didModify", False)  # noqa: B010
            archive.close()
            _restore(target)
            raise
    _journal_of(target).unlink()
    _fsync(target.parent)
    return member, target.stat().st_size - start_dir


def _create(target: Path, deflated: Deflated, member: str) -> int:
    """Make the zip at ``target`` with ``member`` alone (a temporary name, fsync, read back,
    rename); returns the bytes written."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(partial, 0o600)
        with zipfile.ZipFile(partial, "a") as archive:
            _append_deflated(archive, deflated, member)
        _fsync(partial)
        _verify_copied(partial, member, deflated)
        written = partial.stat().st_size
        os.replace(partial, target)
        _fsync(target.parent)
    finally:
        partial.unlink(missing_ok=True)
    return written


def _noted_elsewhere(note: Path | None, parts: list[tuple[int, Path]], member: str,
                     sha256: str) -> tuple[Path, str] | None:
    """The zip ``note`` names (an append this file began earlier; not the day's last zip, which
    is checked anyway) and the member's name in it, if that zip holds this content."""
    try:
        noted = note.read_text().strip() if note is not None else ""
    except OSError:
        return None
    target = next((path for _, path in parts[:-1] if path.name == noted), None)
    if target is None:
        return None
    with zipfile.ZipFile(target) as archive:
        stored = _stored(archive, set(archive.namelist()), member, sha256)
    return (target, stored) if stored else None


def _write_note(note: Path | None, target: Path) -> None:
    """Name the zip an append goes to (not fsync'd: a process that dies leaves it in the page
    cache; without it, the only risk is a second copy of the file in a newer zip)."""
    if note is not None:
        with contextlib.suppress(OSError):
            note.write_text(target.name)


def add_to_archive(backup_dir: Path, run_date: dt.date, source: Path, member: str,
                   sha256: str, level: int = 1, packed: Path | None = None,
                   note: Path | None = None, part_members: int = PART_MEMBERS) -> str:
    """Add ``source`` as ``member`` of the run date's zips; return ``zipname:member``.

    ``packed``: where :func:`precompress` may have left this file's checked stream (its bytes are
    copied, not compressed again); without one the file is deflated and checked here.
    The file goes into the day's last zip, or a new one once that one holds ``part_members``.
    ``note``: a file (in the file's state folder) where the zip is named before the append, so that
    the call made again after a crash looks for the member there, even if the day has a newer zip
    by then; without a note only the last zip is looked in.
    Idempotent: a member with the same name and content is not added twice; a different content
    under the same name in the same zip is kept too, under ``member.<sha8>``.
    """
    backup_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    deflated = Deflated.load(packed) if packed is not None else None
    scratch = backup_dir / f".{source.name}.{os.getpid()}.deflate"
    target = backup_dir / zip_name(run_date)  # the first zip, which names the day's lock
    try:
        if deflated is None or deflated.sha256 != sha256:
            deflated = precompress(source, scratch, level, sha256)
        # One writer per run date on this host.
        with _exclusive(backup_dir / f".{target.name}.lock"):
            parts = day_zips(backup_dir, run_date)
            if parts:
                # An append a crash interrupted is undone first.  Appends go to the last zip only
                # (a new one appears whole, by a rename), after this: no other zip has a journal.
                _restore(parts[-1][1])
            found = _noted_elsewhere(note, parts, member, sha256)
            placed = None
            if found:
                target, member = found
                placed = member, 0
            elif parts:
                target = parts[-1][1]
                _write_note(note, target)
                placed = _append_in_place(target, deflated, member, sha256, part_members)
            if placed is None:
                target = backup_dir / zip_name(run_date, parts[-1][0] + 1 if parts else 1)
                _write_note(note, target)
                placed = member, _create(target, deflated, member)
            member, written = placed
            if not written:
                log.info("%s is already in %s", member, target.name)
                return f"{target.name}:{member}"
    except OSError as error:
        raise ArchiveError(f"cannot write {target}: {error}") from error
    finally:
        scratch.unlink(missing_ok=True)
        Deflated.record_of(scratch).unlink(missing_ok=True)
    log.info("archived %s into %s (%d bytes written)", member, target, written)
    return f"{target.name}:{member}"
