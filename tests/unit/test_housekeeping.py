"""The local folders of past run dates: which go, which stay, and a removal cut short."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from visitas import housekeeping

TODAY = dt.date(2026, 11, 29)
OLD = time.time() - 40 * 86400  # every planted file's mtime, unless a test says otherwise


def _plant(root: Path, relative: str, data: bytes = b"") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _age(*roots: Path) -> None:
    for root in roots:
        for path in [*root.rglob("*"), root]:
            os.utime(path, (OLD, OLD), follow_symlinks=False)


@pytest.fixture
def roots(tmp_path):
    return tmp_path / "download", tmp_path / "state"


def _prune(roots, archived_content=(), keep=14, current=TODAY, **kwargs):
    archived = {hashlib.sha256(data).hexdigest() for data in archived_content}
    return housekeeping.prune_local(*roots, keep, TODAY, current, archived.__contains__, **kwargs)


def test_past_dates_go_unless_recent_current_touched_or_holding_an_unarchived_download(
        roots, caplog):
    download, state = roots
    # 2026-11-01: a finished date, its markers only (ArchiveZip emptied its file folders).
    _plant(state, "20261101/archived/report_1.txt.json", b"{}")
    _plant(state, "20261101/elsewhere/report_2.txt")
    (download / "20261101").mkdir(parents=True)
    # 2026-11-02: a chain that stopped there; a later date loaded and archived the same content.
    _plant(download, "20261102/report_3.txt", b"three\n")
    _plant(state, "20261102/report_3.txt/checked/part-0.parquet", b"batch")
    _plant(download, "20261102/.report_4.txt.part-77", b"half a downl")  # an interrupted download
    # 2026-11-03: a download whose content was never archived: perhaps the only copy left.
    _plant(download, "20261103/report_5.txt", b"five\n")
    _plant(state, "20261103/report_5.txt/remote.json", b"{}")
    _plant(state, "20261103/archived/report_6.txt.json", b"{}")
    # 2026-11-04: old, but a run of that date wrote into it just now (aged below, then touched).
    _plant(state, "20261104/report_7.txt/remote.json", b"{}")
    # 2026-11-20: within the 14 days.
    _plant(state, "20261120/archived/report_8.txt.json", b"{}")
    # Not run dates: left alone whatever their age.
    _plant(state, "rebuild/report_9.txt", b"replay")
    _plant(download, "notes/readme.txt", b"mine")
    _plant(state, "20261399/x", b"not a date")
    _plant(state, "runs/old-run.jsonl", b"{}\n")  # the run mail's records: its own to prune
    _age(download, state)
    os.utime(state / "20261104" / "report_7.txt" / "remote.json")  # now

    told = []
    with caplog.at_level(logging.WARNING, logger="visitas.housekeeping"):
        pruned = _prune(roots, archived_content=[b"three\n"],
                        kept=lambda path, day: told.append((path, day)))

    assert pruned == [dt.date(2026, 11, 1), dt.date(2026, 11, 2)]
    assert told == [(download / "20261103" / "report_5.txt", dt.date(2026, 11, 3))]
    left = sorted(str(p.relative_to(download.parent)) for r in roots for p in r.rglob("*")
                  if p.is_file())
    assert left == sorted([
        "download/20261103/report_5.txt", "download/notes/readme.txt",
        "state/20261103/report_5.txt/remote.json", "state/20261103/archived/report_6.txt.json",
        "state/20261104/report_7.txt/remote.json", "state/20261120/archived/report_8.txt.json",
        "state/rebuild/report_9.txt",
        "state/20261399/x", "state/runs/old-run.jsonl"])
    assert not (download / "20261101").exists() and not (download / "20261102").exists()
    assert "report_5.txt never archived" in caplog.text
    assert "`visitas run --date 2026-11-03`" in caplog.text


def test_the_run_date_itself_is_never_removed_however_old(roots):
    download, state = roots
    _plant(state, "20261001/archived/report_1.txt.json", b"{}")
    _plant(state, "20261002/archived/report_1.txt.json", b"{}")
    _age(download.parent)
    pruned = _prune(roots, current=dt.date(2026, 10, 1))  # a backfill of 2026-10-01
    assert pruned == [dt.date(2026, 10, 2)]
    assert (state / "20261001" / "archived" / "report_1.txt.json").exists()


def test_zero_keeps_everything(roots):
    download, state = roots
    _plant(download, "20250101/report_1.txt", b"one\n")
    _plant(state, "20250101/archived/report_1.txt.json", b"{}")
    _age(download.parent)
    told = []
    pruned = _prune(roots, keep=0, kept=lambda path, day: told.append(path))
    assert (pruned, told) == ([], [])
    assert len([p for r in roots for p in r.rglob("*") if p.is_file()]) == 2


def test_a_removal_cut_short_leaves_no_date_behind_and_is_finished_next_time(roots, monkeypatch):
    download, state = roots
    _plant(state, "20261101/archived/report_1.txt.json", b"{}")
    _plant(state, "20261101/report_2.txt/checked/part-0.parquet", b"batch")
    _age(download.parent)
    real_rmtree = housekeeping.shutil.rmtree

    def crash(path, *args, **kwargs):
        raise KeyboardInterrupt  # the process killed mid-removal

    monkeypatch.setattr(housekeeping.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        _prune(roots)
    # Luigi would read a half-removed date's markers as done: the date is gone under its name.
    assert not (state / "20261101").exists()
    assert (state / ".20261101.pruning" / "archived" / "report_1.txt.json").exists()

    monkeypatch.setattr(housekeeping.shutil, "rmtree", real_rmtree)
    _prune(roots)
    assert list(state.iterdir()) == []
