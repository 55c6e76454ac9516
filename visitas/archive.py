"""The dated backup zip: files go in whole and verified before anything is deleted at the source.

``backup_dir/visitas_YYYYMMDD.zip`` collects every file handled on that run date: loaded files at the
top, ``rejected/`` and ``duplicate/`` ones in folders.  A member is added to a copy of the zip, the
copy is fsync'd, the new member is read back and its sha256 compared with the loaded file's, and
only then does the copy replace the zip (atomic rename): a crash at any point leaves the previous
zip intact, and a second run on the same day adds to it instead of overwriting it.

A member deflated ahead of time (:func:`precompress`, while the database loads) is verified there,
against the loaded file's sha256; once copied into the day's zip, its compressed bytes are read
back and compared with the verified ones instead of being inflated a second time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import os
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_READ = 1024 * 1024
_VERIFIED = "verified-deflate-sha256:"


class ArchiveError(Exception):
    """The archive could not be written or verified: nothing may be deleted at the source."""


def zip_name(run_date: dt.date) -> str:
    return f"visitas_{run_date:%Y%m%d}.zip"


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


def precompress(source: Path, target: Path, level: int, sha256: str) -> None:
    """Deflate ``source`` into a one-member zip ``target``, ahead of the archive step.

    LoadPostgres does this in a thread while the database works, so that ArchiveZip only has to
    copy the compressed bytes into the day's zip.  ``target`` appears (atomic rename) only once
    its member has been inflated again and found to have ``sha256``.
    """
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        archive.write(source, arcname=source.name)
    with zipfile.ZipFile(partial) as archive:
        got = member_sha256(archive, source.name)
    if got != sha256:
        partial.unlink()
        raise ArchiveError(f"{source.name} deflated reads back with sha256 {got[:12]}…,"
                           f" expected {sha256[:12]}…")
    # The verified compressed bytes' own sha256, for checking the copy made from them later.
    with zipfile.ZipFile(partial, "a") as archive:
        archive.comment = (_VERIFIED + _raw_sha256(partial, archive.infolist()[0])).encode()
    os.replace(partial, target)


def _verified_raw_sha256(packed: Path) -> str | None:
    """The sha256 of the compressed bytes that precompress() verified, if ``packed`` has one."""
    try:
        with zipfile.ZipFile(packed) as one:
            comment = one.comment.decode("ascii", errors="replace")
    except (OSError, zipfile.BadZipFile):
        return None
    return comment.removeprefix(_VERIFIED) if comment.startswith(_VERIFIED) else None


def _data_offset(handle, info: zipfile.ZipInfo) -> int:
    """Where a member's compressed bytes start (after its local header)."""
    handle.seek(info.header_offset)
    name_length, extra_length = struct.unpack("<HH", handle.read(30)[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _raw_sha256(path: Path, info: zipfile.ZipInfo) -> str:
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


def _only_member(packed: Path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(packed) as one:
        [info] = one.infolist()
    return info


def _verify_copied(partial: Path, member: str, packed: Path, raw_sha256: str) -> None:
    """The member copied from ``packed`` has its CRC and sizes and the verified bytes."""
    source = _only_member(packed)
    with zipfile.ZipFile(partial) as archive:
        copied = archive.getinfo(member)
    same = ((copied.CRC, copied.file_size, copied.compress_size, copied.compress_type)
            == (source.CRC, source.file_size, source.compress_size, source.compress_type))
    if not same or _raw_sha256(partial, copied) != raw_sha256:
        raise ArchiveError(f"{member} in {partial.name} does not read back as the verified"
                           f" compressed bytes of {packed.name}")


def _append_compressed(archive: zipfile.ZipFile, packed: Path, member: str) -> None:
    """Copy the single, already compressed member of ``packed`` into ``archive`` as ``member``."""
    info = _only_member(packed)
    entry = zipfile.ZipInfo(member, date_time=info.date_time)
    entry.compress_type, entry.CRC = info.compress_type, info.CRC
    entry.compress_size, entry.file_size = info.compress_size, info.file_size
    entry.external_attr = info.external_attr
    zip64 = max(entry.file_size, entry.compress_size) > zipfile.ZIP64_LIMIT
    with open(packed, "rb") as source:
        source.seek(_data_offset(source, info))
        archive.fp.seek(archive.start_dir)
        entry.header_offset = archive.fp.tell()
        archive.fp.write(entry.FileHeader(zip64))
        remaining = info.compress_size
        while remaining:
            chunk = source.read(min(_READ, remaining))
            if not chunk:
                raise ArchiveError(f"{packed} is truncated")
            archive.fp.write(chunk)
            remaining -= len(chunk)
    archive.start_dir = archive.fp.tell()
    archive.filelist.append(entry)
    archive.NameToInfo[member] = entry
    archive._didModify = True  # noqa: SLF001 - write the central directory on close


def add_to_archive(backup_dir: Path, run_date: dt.date, source: Path, member: str,
                   sha256: str, level: int = 6, packed: Path | None = None) -> str:
    """Add ``source`` as ``member`` of the run date's zip; return ``zipname:member``.

    ``packed``: the same file already deflated by :func:`precompress` (its bytes are copied, not
    compressed again).  Idempotent: a member with the same name and content is not added twice;
    a different content under the same name is kept too, under ``member.<sha8>``.
    """
    backup_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = backup_dir / zip_name(run_date)
    with _exclusive(backup_dir / f".{target.name}.lock"):
        if target.exists():
            with zipfile.ZipFile(target) as existing:
                names = set(existing.namelist())
                if member in names and member_sha256(existing, member) == sha256:
                    log.info("%s is already in %s", member, target.name)
                    return f"{target.name}:{member}"
                if member in names:
                    member = f"{member}.{sha256[:8]}"
                    if member in names and member_sha256(existing, member) == sha256:
                        return f"{target.name}:{member}"
        partial = backup_dir / f".{target.name}.{os.getpid()}.partial"
        try:
            if target.exists():
                shutil.copyfile(target, partial)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(partial, 0o600)
            raw_sha256 = _verified_raw_sha256(packed) if packed is not None and packed.exists() else None
            use_packed = raw_sha256 is not None
            with zipfile.ZipFile(partial, "a", compression=zipfile.ZIP_DEFLATED,
                                 compresslevel=level) as archive:
                if use_packed:
                    _append_compressed(archive, packed, member)
                else:
                    archive.write(source, arcname=member)
            _fsync(partial)
            if use_packed:  # its content was verified by precompress()
                _verify_copied(partial, member, packed, raw_sha256)
            else:
                with zipfile.ZipFile(partial) as archive:
                    got = member_sha256(archive, member)
                if got != sha256:
                    raise ArchiveError(f"{member} in {target.name} reads back with sha256"
                                       f" {got[:12]}…, expected {sha256[:12]}…")
            os.replace(partial, target)
            _fsync(backup_dir)
        except OSError as error:
            raise ArchiveError(f"cannot write {target}: {error}") from error
        finally:
            partial.unlink(missing_ok=True)
    log.info("archived %s into %s", member, target)
    return f"{target.name}:{member}"
