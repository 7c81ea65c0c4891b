"""Several replicas on one database: jobs that run once per period, one sender per chat.

- ``job_runs``: one row per scheduled job (the hourly decision, the improvement loop,
  retention, backups). A replica runs a period's job only after it took the row's lease in a
  committed UPDATE; a replica killed mid-job leaves a lease that expires, and the next one
  runs the period again. ``done_period``: the last period finished, so a period is not run
  twice once it completed.
- ``chat_senders``: which replica sends a chat's outbox messages, leased: one sender per chat
  keeps Telegram's per-chat limit (1 message a second, 20 a minute in a group) and the order
  of a chat's messages, whichever replica stored them.

Revision ID: 008
Revises: 007
"""

from __future__ import annotations

from alembic import op

revision = "008"
down_revision = "007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    big = "INTEGER" if sqlite else "BIGINT"
    real = "REAL" if sqlite else "DOUBLE PRECISION"
    op.execute(f"""CREATE TABLE job_runs (
        name        TEXT PRIMARY KEY,
        period      {big} NOT NULL,
        holder      TEXT,
        lease_until {real},
        started_at  {real},
        done_period {big},
        finished_at {real}
    )""")
    op.execute(f"""CREATE TABLE chat_senders (
        chat_id     {big} PRIMARY KEY,
        owner       TEXT NOT NULL,
        lease_until {real} NOT NULL
    )""")


def downgrade() -> None:
    raise NotImplementedError("loopbot restores backups instead of downgrading")
