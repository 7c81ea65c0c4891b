"""The paired comparison: the label the other arm's prompt gives a voted verdict's text.

- ``paired_labels``: one row per interaction and scoring version. Every verdict of a running
  test that got a vote is also scored by the other arm's prompt (the candidate's for a
  verdict of the active version, the active one's for a candidate's verdict); ``label`` is
  that prompt's label, ``scorer`` the scorer that produced it (as ``interactions.scorer``).
  The key includes the version: with several candidates at once, a verdict of the active
  version is scored by each of them. No text is stored here: /forget deletes the rows with
  their interaction (explicitly, and by the cascade), retention leaves them (a label says
  nothing the verdict did not).

Revision ID: 009
Revises: 008
"""

from __future__ import annotations

from alembic import op

revision = "009"
down_revision = "008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    big = "INTEGER" if sqlite else "BIGINT"
    real = "REAL" if sqlite else "DOUBLE PRECISION"
    op.execute(f"""CREATE TABLE paired_labels (
        interaction_id {big} NOT NULL REFERENCES interactions (id) ON DELETE CASCADE,
        version_id     TEXT NOT NULL,
        label          TEXT NOT NULL,
        scorer         TEXT NOT NULL,
        created_at     {real} NOT NULL,
        PRIMARY KEY (interaction_id, version_id)
    )""")


def downgrade() -> None:
    raise NotImplementedError("loopbot restores backups instead of downgrading")
