"""Reading a downloaded report: its hashes, its header, and its lines in bounded pieces.

A file is read in pieces of whole lines (``batch_bytes`` at a time), so memory does not grow with
the size of the file; a line longer than ``max_line_bytes`` is never held whole.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from visitas.transform import contract

BATCH_BYTES = 8 * 1024 * 1024
PARALLEL_BATCHES = 2
_MAX_HEADER_BYTES = 1024 * 1024
# A loaded file's first bytes are hashed apart: the cheap first test of "is it a prefix of this
# new file?" (an extension), before the whole prefix is hashed.
HEAD_BYTES = 4096
BOM = codecs.BOM_UTF8


def inspect_file(path: Path) -> tuple[str, str, int]:
    """One pass over the file: ``(sha256, sha256 of the first HEAD_BYTES, size)``.

    Raises :class:`contract.FileRejected` for an empty file.
    """
    size = path.stat().st_size
    if size == 0:
        raise contract.FileRejected("empty_file", "the file is empty (0 bytes)")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
        chunk = head
        while chunk:
            digest.update(chunk)
            chunk = handle.read(BATCH_BYTES)
    return digest.hexdigest(), hashlib.sha256(head).hexdigest(), size


def prefix_sha256(path: Path, sizes: Iterable[int]) -> dict[int, str]:
    """sha256 of the first ``n`` bytes of the file for each ``n`` in ``sizes``, in one pass."""
    wanted = sorted(set(sizes))
    digest, done = hashlib.sha256(), 0
    found: dict[int, str] = {}
    with open(path, "rb") as handle:
        for size in wanted:
            while done < size:
                chunk = handle.read(min(BATCH_BYTES, size - done))
                if not chunk:
                    return found
                digest.update(chunk)
                done += len(chunk)
            found[size] = digest.copy().hexdigest()
    return found


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(BATCH_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Header:
    text: str
    data_start: int  # byte offset of the first data line
    has_bom: bool
    cp1252: bool  # the header line was not UTF-8
    utf8_non_ascii: bool


def read_header(path: Path) -> Header:
    """The first line, after a BOM: decoded on its own, checked to be text, and where the data
    lines start.  Raises FileRejected (binary_file, no_header)."""
    with open(path, "rb") as handle:
        head = handle.read(_MAX_HEADER_BYTES + len(BOM) + 1)
    has_bom = head.startswith(BOM)
    offset = len(BOM) if has_bom else 0
    ends = [i for i in (head.find(b"\n", offset), head.find(b"\r", offset)) if i >= 0]
    end = min(ends) if ends else len(head)
    line = head[offset:end]
    contract.check_text_header(line[:_MAX_HEADER_BYTES])
    if not ends and len(head) > _MAX_HEADER_BYTES:
        raise contract.FileRejected("no_header", "no line end in the first 1 MiB: no header line")
    if len(line) > _MAX_HEADER_BYTES:
        raise contract.FileRejected("no_header", "the first line is longer than 1 MiB: no header")
    text, cp1252 = contract.decode_line(line)
    width = 2 if head[end:end + 2] == b"\r\n" else 1
    return Header(text, end + width, has_bom, cp1252, not cp1252 and not line.isascii())


@dataclasses.dataclass(frozen=True)
class RawLines:
    """Whole lines of a file as bytes, or (``overlong``) the start of one line too long to hold."""

    data: bytes
    first_line_no: int
    end_offset: int
    overlong: bool = False


def iter_raw_lines(path: Path, start: int, first_line_no: int, batch_bytes: int = BATCH_BYTES,
                   max_line_bytes: int = contract.MAX_LINE_BYTES) -> Iterator[RawLines]:
    """The file from byte ``start`` on in pieces of whole lines (LF, CRLF and a lone CR end a
    line), about ``batch_bytes`` each.  A line longer than ``max_line_bytes`` is never held
    whole: its first bytes are kept and the rest is read past, so time and memory stay linear."""
    line_no = first_line_no
    with open(path, "rb") as handle:
        handle.seek(start)
        carry = b""  # the start of a line, never more than max_line_bytes
        while True:
            chunk = handle.read(batch_bytes)
            if not chunk:
                if carry:
                    yield RawLines(carry, line_no, handle.tell())
                return
            data = carry + chunk
            cut = _after_last_line_end(data)
            whole, carry = data[:cut], data[cut:]
            if whole:
                yield RawLines(whole, line_no, handle.tell() - len(carry))
                line_no += contract.count_line_ends(whole)
            if len(carry) > max_line_bytes:
                excerpt = carry[:contract.EXCERPT_BYTES]
                carry = _read_past_line_end(handle, carry, batch_bytes)
                yield RawLines(excerpt, line_no, handle.tell() - len(carry), overlong=True)
                line_no += 1


def _after_last_line_end(data: bytes) -> int:
    """Where the last certain line end of ``data`` stops (0: none).  A CR as the very last
    byte is not certain: it may be the first half of a CRLF."""
    return max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1


def _read_past_line_end(handle, data: bytes, batch_bytes: int) -> bytes:
    """Skip the rest of the current line (``data`` is its start); return what follows it."""
    while True:
        ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
        if ends:
            end = min(ends)
            rest = data[end + 1:]
            if data[end:end + 1] == b"\r":
                if not rest:
                    rest = handle.read(batch_bytes)
                rest = rest.removeprefix(b"\n")
            return rest
        data = handle.read(batch_bytes)
        if not data:
            return b""


