"""Advisory lock keys (the first int of PostgreSQL's two-int form): one namespace per purpose."""

import hashlib

LOCK_SCHEMA = 7301    # migrations
LOCK_FILE = 7302      # one file's load (second int: from its sha256)
LOCK_VISITORS = 7303  # the visitor merge
LOCK_RUN = 7304       # preparing a run date


def lock_key(text: str) -> int:
    """A stable signed 32-bit key for the two-int advisory lock form."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big", signed=True)
