"""Reads of a SQLite database another process is writing (benchmarks watch ``loopbot run``
this way): read-only, never creating the file, never holding the writer up for long."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path


def reply_texts(db: Path, messages: Iterable[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """The stored reply text of each (chat id, message id) that has one."""
    found: dict[tuple[int, int], str] = {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        for chat_id, message_id in messages:
            row = conn.execute(
                "SELECT reply_text FROM interactions WHERE chat_id = ? AND message_id = ?",
                (chat_id, message_id)).fetchone()
            if row is not None and row[0] is not None:
                found[(chat_id, message_id)] = str(row[0])
    return found
