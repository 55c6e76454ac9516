"""Every path derived from a run date and a file name, in one place.

    download_dir/YYYYMMDD/<file>                       the downloaded file
    state_dir/YYYYMMDD/<file>/remote.json              its size and mtime at the source
    state_dir/YYYYMMDD/<file>/checked/                 checked batches and verdict.json
    state_dir/YYYYMMDD/<file>/split/                   errors.copy, visitors.parquet, summary.json
    state_dir/YYYYMMDD/<file>/reload/                  a split of part of the file (LoadPostgres)
    state_dir/YYYYMMDD/<file>/backup.deflate(.json)    the deflated backup, checked
    state_dir/YYYYMMDD/<file>/backup.zipname           the zip ArchiveZip is adding it to
    state_dir/YYYYMMDD/archived/<file>.json            ArchiveZip's marker
    state_dir/YYYYMMDD/elsewhere/<file>                taken by another worker or host
    state_dir/YYYYMMDD/deferred/<file>                 left at the source by a run (its run id)
    state_dir/runs/<run id>.jsonl                      a run's failures and deferrals

A run date's folders are removed ``[paths] keep_state_days`` after it (:mod:`visitas.housekeeping`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class UnsafeName(ValueError):
    """A remote file name that must not become part of a local path."""


def check_safe(name: str) -> str:
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise UnsafeName(f"refusing remote file name {name!r}: only [A-Za-z0-9._-] are allowed")
    return name


@dataclasses.dataclass(frozen=True)
class RunPaths:
    date: dt.date
    download_root: Path
    state_root: Path

    @classmethod
    def from_config(cls, date: dt.date) -> RunPaths:
        from visitas import config

        settings = config.paths()
        return cls(date, Path(settings.download_dir), Path(settings.resolved_state_dir()))

    @property
    def day(self) -> str:
        return f"{self.date:%Y%m%d}"

    def download(self, name: str) -> Path:
        return self.download_root / self.day / check_safe(name)

    def state(self, name: str, *parts: str) -> Path:
        return self.state_root.joinpath(self.day, check_safe(name), *parts)

    def remote_record(self, name: str) -> Path:
        return self.state(name, "remote.json")

    def checked(self, name: str) -> Path:
        return self.state(name, "checked")

    def split(self, name: str) -> Path:
        return self.state(name, "split")

    def reload(self, name: str) -> Path:
        return self.state(name, "reload")

    def deflated(self, name: str) -> Path:
        return self.state(name, "backup.deflate")

    def zip_note(self, name: str) -> Path:
        return self.state(name, "backup.zipname")

    def archived(self, name: str) -> Path:
        return self.state_root / self.day / "archived" / f"{check_safe(name)}.json"

    def elsewhere(self, name: str) -> Path:
        return self.state_root / self.day / "elsewhere" / check_safe(name)

    def deferred(self, name: str) -> Path:
        return self.state_root / self.day / "deferred" / check_safe(name)

    @staticmethod
    def events(state_root: Path, run_id: str) -> Path:
        return state_root / "runs" / f"{run_id}.jsonl"

    @staticmethod
    def is_download(name: str) -> bool:
        """A name in a date's download folder that is a complete download (one under way has a
        temporary name beginning with a dot)."""
        return not name.startswith(".") and SAFE_NAME.match(name) is not None
