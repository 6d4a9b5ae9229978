"""runs: the indexes that only unfinished runs need hold only unfinished runs; room on each page for updates

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 00:20:00.000000

`ix_runs_due` (the runner's wake-ups), `ix_runs_concurrency` (a pool's slots) and `ix_runs_state` (waiting runs,
the runs-active gauge) are read only for runs still going, or in a `concurrency:` pool; yet every run ever
started had an entry in each, written when the run was inserted and again on every update that could not stay on
its page (the card's ts, for one). As partial indexes they hold only the runs they are read for: a run that ends
where it starts (a notification-only workflow) writes five index entries instead of eight, and none of the three
grows with the runs kept for the record. Their queries say `finished_at IS NULL` (a run has `finished_at` exactly
when it has ended) or compare the indexed column, which implies `IS NOT NULL`.

On PostgreSQL, `runs` pages are also filled to 80 % only. Every run is updated at least once soon after it is
inserted (its card's ts, leases, the wake-up time); with no room left on its page, PostgreSQL writes the new
version elsewhere and a new entry in each of the table's indexes. With room, the update stays on the page and
touches no index, unless it changes an indexed column.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

# name, columns, and the rows it now holds
PARTIAL = (
    ("ix_runs_due", ["wake_at"], sa.text("wake_at IS NOT NULL")),
    ("ix_runs_concurrency", ["concurrency_key", "state"], sa.text("concurrency_key IS NOT NULL")),
    ("ix_runs_state", ["state", "team_id", "created_at"], sa.text("finished_at IS NULL")),
)


def _set_fillfactor(percent: int) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE runs SET (fillfactor = {percent})")


def _rebuild(*, partial: bool) -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        for name, columns, where in PARTIAL:
            batch_op.drop_index(name)
            batch_op.create_index(name, columns, unique=False, postgresql_where=where if partial else None,
                                  sqlite_where=where if partial else None)


def upgrade() -> None:
    _set_fillfactor(80)
    _rebuild(partial=True)


def downgrade() -> None:
    _set_fillfactor(100)
    _rebuild(partial=False)
