"""The shared log file: several processes writing and rotating it at once lose no line."""

import logging
import multiprocessing
from pathlib import Path

from visitas.runtime.logsetup import SharedRotatingFileHandler

LINES = 3000


def _write(path: str, worker: int) -> None:
    logger = logging.getLogger(f"visitas.test.{worker}")
    logger.propagate = False
    handler = SharedRotatingFileHandler(Path(path), max_bytes=40_000, backups=10_000)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    for n in range(LINES):
        logger.warning("worker %d line %05d %s", worker, n, "x" * (n % 97))
    handler.close()


def test_processes_rotating_one_file_lose_and_break_no_line(tmp_path):
    path = tmp_path / "visitas.log"
    context = multiprocessing.get_context("fork")  # as Luigi's worker processes
    workers = [context.Process(target=_write, args=(str(path), w)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    files = sorted(tmp_path.glob("visitas.log*"))
    assert len(files) > 20  # it did rotate, many times, while all four wrote
    lines = [line for f in files for line in f.read_text().splitlines()]
    expected = {f"worker {w} line {n:05d} {'x' * (n % 97)}" for w in range(4) for n in range(LINES)}
    assert len(lines) == len(expected) and set(lines) == expected
    # A process that wrote just as another rotated adds its one record to the file it had open.
    assert all(f.stat().st_size <= 40_000 + 4 * 150 for f in files)
    # ... and only a full file is rotated (never one another process has just started).
    assert all(f.stat().st_size > 40_000 - 150 for f in files if f.name != "visitas.log")


def test_the_oldest_backups_are_dropped(tmp_path):
    path = tmp_path / "visitas.log"
    handler = SharedRotatingFileHandler(path, max_bytes=100, backups=2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for n in range(10):
        handler.emit(logging.LogRecord("t", logging.INFO, __file__, 1, f"record {n} " + "y" * 40,
                                       None, None))
    handler.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "visitas.log", "visitas.log.1", "visitas.log.2"]
    assert path.read_text().splitlines()[-1].startswith("record 9 ")
    assert (tmp_path / "visitas.log.2").read_text().startswith("record 4 ")
