"""The dated backup zip (local files only)."""

import datetime as dt
import hashlib
import stat
import threading
import zipfile

import pytest

from visitas import archive

DAY = dt.date(2026, 11, 28)


def _file(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("precompressed", [False, True])
def test_members_are_added_byte_identical_and_private(tmp_path, precompressed):
    backup = tmp_path / "bckp"
    added = {}
    for i, data in enumerate([b"a,b\r\n" * 5000, bytes(range(256)) * 100]):
        path, sha = _file(tmp_path, f"report_{i}.txt", data)
        packed = None
        if precompressed:
            packed = tmp_path / f"packed_{i}.zip"
            archive.precompress(path, packed, level=3, sha256=sha)
        where = archive.add_to_archive(backup, DAY, path, path.name, sha, packed=packed)
        assert where == f"visitas_20261128.zip:{path.name}"
        added[path.name] = data
    zip_path = backup / "visitas_20261128.zip"
    with zipfile.ZipFile(zip_path) as result:
        assert result.testzip() is None
        assert {n: result.read(n) for n in result.namelist()} == added
    assert stat.S_IMODE(zip_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700


def test_adding_again_is_idempotent_and_a_new_content_keeps_both(tmp_path):
    backup = tmp_path / "bckp"
    path, sha = _file(tmp_path, "report_1.txt", b"first")
    archive.add_to_archive(backup, DAY, path, "report_1.txt", sha)
    assert archive.add_to_archive(backup, DAY, path, "report_1.txt", sha).endswith(":report_1.txt")
    path, sha2 = _file(tmp_path, "report_1.txt", b"second")
    where = archive.add_to_archive(backup, DAY, path, "report_1.txt", sha2)
    assert where.endswith(f":report_1.txt.{sha2[:8]}")
    with zipfile.ZipFile(backup / "visitas_20261128.zip") as result:
        assert result.read("report_1.txt") == b"first"
        assert result.read(f"report_1.txt.{sha2[:8]}") == b"second"


def test_a_wrong_checksum_leaves_the_previous_zip_untouched(tmp_path):
    backup = tmp_path / "bckp"
    path, sha = _file(tmp_path, "report_1.txt", b"good")
    archive.add_to_archive(backup, DAY, path, "report_1.txt", sha)
    before = (backup / "visitas_20261128.zip").read_bytes()
    other, _ = _file(tmp_path, "report_2.txt", b"bad")
    with pytest.raises(archive.ArchiveError, match="inflates to sha256"):
        archive.add_to_archive(backup, DAY, other, "report_2.txt", "0" * 64)
    assert (backup / "visitas_20261128.zip").read_bytes() == before
    assert [p.name for p in backup.iterdir() if p.name.endswith(".partial")] == []



def test_precompress_refuses_a_content_that_does_not_match(tmp_path):
    path, _ = _file(tmp_path, "report_1.txt", b"a,b\n" * 100)
    packed = tmp_path / "packed.deflate"
    with pytest.raises(archive.ArchiveError, match="inflates to sha256"):
        archive.precompress(path, packed, level=1, sha256="0" * 64)
    assert list(tmp_path.glob("packed*")) == []


def test_a_checked_stream_damaged_afterwards_is_refused(tmp_path):
    backup = tmp_path / "bckp"
    first, sha1 = _file(tmp_path, "report_1.txt", b"good")
    archive.add_to_archive(backup, DAY, first, "report_1.txt", sha1)
    before = (backup / "visitas_20261128.zip").read_bytes()
    path, sha = _file(tmp_path, "report_2.txt", bytes(range(256)) * 400)
    packed = tmp_path / "packed.deflate"
    archive.precompress(path, packed, level=1, sha256=sha)
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    with pytest.raises(archive.ArchiveError, match="does not read back as the checked"):
        archive.add_to_archive(backup, DAY, path, "report_2.txt", sha, packed=packed)
    assert (backup / "visitas_20261128.zip").read_bytes() == before
    assert sorted(p.name for p in backup.iterdir()) == [".visitas_20261128.zip.lock",
                                                       "visitas_20261128.zip"]


@pytest.mark.parametrize("record", ["missing", "other content"])
def test_a_stream_without_a_matching_record_is_not_used(tmp_path, record):
    backup = tmp_path / "bckp"
    path, sha = _file(tmp_path, "report_1.txt", b"a,b\n" * 1000)
    other, other_sha = _file(tmp_path, "other.txt", b"something else")
    packed = tmp_path / "packed.deflate"
    archive.precompress(other, packed, level=1, sha256=other_sha)
    if record == "missing":
        archive.Deflated.record_of(packed).unlink()
    archive.add_to_archive(backup, DAY, path, "report_1.txt", sha, packed=packed)
    with zipfile.ZipFile(backup / "visitas_20261128.zip") as result:
        assert result.read("report_1.txt") == b"a,b\n" * 1000


def test_zip_level_outside_isal_levels_is_refused(tmp_path):
    path, sha = _file(tmp_path, "report_1.txt", b"x")
    with pytest.raises(ValueError, match="0-3"):
        archive.precompress(path, tmp_path / "p.deflate", level=6, sha256=sha)


def test_checking_a_stream_inflates_in_bounded_pieces(tmp_path, monkeypatch):
    # 64 MiB of zeros deflate to ~64 KiB: one unbounded inflate call would return all of it.
    path = tmp_path / "zeros.txt"
    with open(path, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    sha = hashlib.sha256(b"\0" * (64 * 1024 * 1024)).hexdigest()
    pieces = []
    real = archive.isal_zlib.decompressobj

    class Spy:
        def __init__(self, wbits):
            self._inner = real(wbits)

        def decompress(self, data, max_length=0):
            out = self._inner.decompress(data, max_length)
            pieces.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self._inner, name)

    monkeypatch.setattr(archive.isal_zlib, "decompressobj", Spy)
    archive.precompress(path, tmp_path / "zeros.deflate", level=1, sha256=sha)
    assert sum(pieces) == 64 * 1024 * 1024 and max(pieces) <= 1024 * 1024


def _start_dir(zip_path) -> int:
    with zipfile.ZipFile(zip_path) as existing:
        return existing.start_dir


def test_an_append_writes_the_new_member_only(tmp_path):
    """Adding a file costs that file: the zip is not copied, its earlier bytes are not rewritten."""
    backup = tmp_path / "bckp"
    first, sha1 = _file(tmp_path, "report_1.txt", bytes(range(256)) * 4000)
    archive.add_to_archive(backup, DAY, first, "report_1.txt", sha1)
    zip_path = backup / "visitas_20261128.zip"
    inode, start = zip_path.stat().st_ino, _start_dir(zip_path)
    prefix = zip_path.read_bytes()[:start]
    second, sha2 = _file(tmp_path, "report_2.txt", b"x,y\n" * 300)
    archive.add_to_archive(backup, DAY, second, "report_2.txt", sha2)
    assert zip_path.stat().st_ino == inode  # appended in place, not replaced by a copy
    assert zip_path.read_bytes()[:start] == prefix
    with zipfile.ZipFile(zip_path) as result:
        assert result.testzip() is None
        assert result.read("report_2.txt") == b"x,y\n" * 300
    assert [p.name for p in backup.iterdir() if "journal" in p.name] == []


def test_an_append_a_crash_interrupted_is_undone_by_the_next_call(tmp_path, monkeypatch):
    backup = tmp_path / "bckp"
    first, sha1 = _file(tmp_path, "report_1.txt", b"first file\n" * 100)
    archive.add_to_archive(backup, DAY, first, "report_1.txt", sha1)
    zip_path = backup / "visitas_20261128.zip"
    before, start = zip_path.read_bytes(), _start_dir(zip_path)

    def dies_halfway(target_zip, deflated, member):  # bytes over the old directory, then death
        target_zip.fp.seek(target_zip.start_dir)
        target_zip.fp.write(b"\x00" * 100)
        target_zip.fp.flush()
        raise KeyboardInterrupt("the process died")

    monkeypatch.setattr(archive, "_append_deflated", dies_halfway)
    monkeypatch.setattr(archive, "_restore", lambda target: None)  # a dead process undoes nothing
    second, sha2 = _file(tmp_path, "report_2.txt", b"second file\n" * 100)
    with pytest.raises(KeyboardInterrupt):
        archive.add_to_archive(backup, DAY, second, "report_2.txt", sha2)
    assert zip_path.read_bytes() != before  # damaged, with its journal beside it
    monkeypatch.undo()

    third, sha3 = _file(tmp_path, "report_3.txt", b"third file\n" * 100)
    archive.add_to_archive(backup, DAY, third, "report_3.txt", sha3)
    with zipfile.ZipFile(zip_path) as result:
        assert result.testzip() is None
        assert result.namelist() == ["report_1.txt", "report_3.txt"]
        assert result.read("report_1.txt") == b"first file\n" * 100
    assert zip_path.read_bytes()[:start] == before[:start]  # report_1.txt's bytes never rewritten


def test_backups_older_than_the_retention_are_deleted_and_nothing_else(tmp_path):
    import datetime as dt
    import fcntl

    today = dt.date(2026, 11, 29)
    names = ["visitas_20261029.zip", "visitas_20261030.zip", "visitas_20261128.zip",
             "visitas_20260101.zip", "visitas_20250101.zip", "visitas_20261001.zip",
             "visitas_20261002.zip", "notes.txt", "visitas_2026.zip", "visitas_20261399.zip"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".visitas_20261029.zip.lock").write_bytes(b"")
    (tmp_path / ".visitas_20261002.zip.journal").write_bytes(b"")  # an interrupted append
    with open(tmp_path / ".visitas_20261001.zip.lock", "a") as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)  # being appended to by another worker
        deleted = archive.prune_backups(tmp_path, 30, today, current=dt.date(2026, 1, 1))
    assert sorted(p.name for p in deleted) == ["visitas_20250101.zip", "visitas_20261029.zip"]
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == sorted(set(names) - {"visitas_20250101.zip", "visitas_20261029.zip"}
                          | {".visitas_20261002.zip.journal"})
    assert not (tmp_path / ".visitas_20261029.zip.lock").exists()
    assert archive.prune_backups(tmp_path, 0, today, today) == []  # 0: keep all


@pytest.mark.parametrize("fails", ["after the member is written", "at the read-back"])
def test_an_append_that_fails_puts_the_previous_zip_back(tmp_path, monkeypatch, fails):
    backup = tmp_path / "bckp"
    first, sha1 = _file(tmp_path, "report_1.txt", b"first file\n" * 100)
    archive.add_to_archive(backup, DAY, first, "report_1.txt", sha1)
    zip_path = backup / "visitas_20261128.zip"
    before = zip_path.read_bytes()
    if fails == "at the read-back":
        def broken(*args):
            raise archive.ArchiveError("does not read back")
        monkeypatch.setattr(archive, "_verify_copied", broken)
    else:
        append = archive._append_deflated

        def broken(*args):
            append(*args)
            raise archive.ArchiveError("the disk went away")
        monkeypatch.setattr(archive, "_append_deflated", broken)
    second, sha2 = _file(tmp_path, "report_2.txt", b"second file\n" * 100)
    with pytest.raises(archive.ArchiveError):
        archive.add_to_archive(backup, DAY, second, "report_2.txt", sha2)
    assert zip_path.read_bytes() == before
    assert [p.name for p in backup.iterdir() if "journal" in p.name] == []


def _add(backup, tmp_path, i, size=3000, **kwargs):
    path, sha = _file(tmp_path, f"report_{i}.txt", (b"%d,visit\n" % i) * (size // 8))
    return archive.add_to_archive(backup, DAY, path, path.name, sha, **kwargs)


def test_a_full_zip_is_left_as_it_is_and_the_day_goes_on_in_a_new_one(tmp_path):
    backup = tmp_path / "bckp"
    where = [_add(backup, tmp_path, i, part_members=2) for i in range(1, 6)]
    assert where == ["visitas_20261128.zip:report_1.txt", "visitas_20261128.zip:report_2.txt",
                     "visitas_20261128_2.zip:report_3.txt", "visitas_20261128_2.zip:report_4.txt",
                     "visitas_20261128_3.zip:report_5.txt"]
    first = (backup / "visitas_20261128.zip").read_bytes()
    _add(backup, tmp_path, 6, part_members=2)
    assert (backup / "visitas_20261128.zip").read_bytes() == first
    for name, members in [("visitas_20261128.zip", [1, 2]), ("visitas_20261128_2.zip", [3, 4]),
                          ("visitas_20261128_3.zip", [5, 6])]:
        with zipfile.ZipFile(backup / name) as result:
            assert result.testzip() is None
            assert result.namelist() == [f"report_{i}.txt" for i in members]
    assert [p for _, p in archive.day_zips(backup, DAY)] == [
        backup / "visitas_20261128.zip", backup / "visitas_20261128_2.zip",
        backup / "visitas_20261128_3.zip"]


def _written(caplog) -> list[int]:
    return [int(r.getMessage().rsplit("(", 1)[1].split()[0]) for r in caplog.records
            if r.getMessage().startswith("archived ")]


@pytest.mark.parametrize("part_members", [5, 1000])
def test_bytes_written_per_file_do_not_grow_with_the_day(tmp_path, caplog, part_members):
    """Each append rewrites its zip's central directory: bounded by the members per zip."""
    caplog.set_level("INFO", logger="visitas.archive")
    backup = tmp_path / "bckp"
    for i in range(1, 61):  # same size, same name length: only the directory differs
        _add(backup, tmp_path, 10 + i, part_members=part_members)
    written = _written(caplog)
    assert len(written) == 60
    grows = max(written[40:]) - max(written[:5])
    if part_members == 5:
        assert grows <= 0
    else:  # one zip for the day: each append writes a directory of every member so far
        assert grows > 35 * 40


def test_a_file_added_again_after_a_crash_is_found_in_the_zip_its_note_names(tmp_path):
    backup = tmp_path / "bckp"
    note = tmp_path / "backup.zipname"
    assert _add(backup, tmp_path, 1, part_members=2) == "visitas_20261128.zip:report_1.txt"
    assert _add(backup, tmp_path, 2, part_members=2, note=note) == "visitas_20261128.zip:report_2.txt"
    assert note.read_text() == "visitas_20261128.zip"
    _add(backup, tmp_path, 3, part_members=2)  # the day goes on in a second zip meanwhile
    sizes = {p.name: p.stat().st_size for p in backup.glob("*.zip")}
    # report_2.txt's step died after the append, before the database recorded it: run again
    assert _add(backup, tmp_path, 2, part_members=2, note=note) == "visitas_20261128.zip:report_2.txt"
    assert {p.name: p.stat().st_size for p in backup.glob("*.zip")} == sizes
    # Without its note it would be looked for in the last zip only, and stored there again.
    assert _add(backup, tmp_path, 2, part_members=2) == "visitas_20261128_2.zip:report_2.txt"


def test_old_days_are_pruned_with_all_their_zips(tmp_path):
    import fcntl

    names = ["visitas_20261001.zip", "visitas_20261001_2.zip", "visitas_20261001_10.zip",
             "visitas_20261002.zip", "visitas_20261002_2.zip", "visitas_20261003_2.zip",
             "visitas_20261004.zip", "visitas_20261004_2.zip",
             "visitas_20261001_1.zip", "visitas_20261001_02.zip", "visitas_20261001_x.zip",
             "visitas_20261128.zip", "visitas_20261128_2.zip"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".visitas_20261002_2.zip.journal").write_bytes(b"")  # an interrupted append
    with open(tmp_path / ".visitas_20261004.zip.lock", "a") as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)  # being appended to by another worker
        deleted = archive.prune_backups(tmp_path, 30, dt.date(2026, 11, 29), current=DAY)
    assert sorted(p.name for p in deleted) == [
        "visitas_20261001.zip", "visitas_20261001_10.zip", "visitas_20261001_2.zip",
        "visitas_20261003_2.zip"]
    assert sorted(p.name for p in tmp_path.glob("visitas_*")) == sorted(
        set(names) - {p.name for p in deleted})


def test_threads_adding_to_one_day_at_once_lose_no_member(tmp_path):
    """``visitas run --workers N`` archives files in threads of one process: the day's lock
    (a flock on a file opened anew by each call) excludes them as it excludes processes."""
    backup = tmp_path / "bckp"
    start = threading.Barrier(4)
    where: dict[int, str] = {}

    def add(first: int) -> None:
        start.wait(60)
        for i in range(first, 40, 4):
            where[i] = _add(backup, tmp_path, i, size=20_000, part_members=7)

    threads = [threading.Thread(target=add, args=(first,)) for first in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(where) == list(range(40))
    found = {}
    for _, zip_path in archive.day_zips(backup, DAY):
        with zipfile.ZipFile(zip_path) as result:
            assert result.testzip() is None
            assert len(result.namelist()) <= 7
            found.update({f"{zip_path.name}:{n}": result.read(n) for n in result.namelist()})
    assert sorted(found) == sorted(where.values())
    assert all(found[where[i]] == (b"%d,visit\n" % i) * 2500 for i in range(40))
