"""runs: on PostgreSQL, half of each page is kept free, so that updating a run keeps it on its page

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 02:30:00.000000

Every run is updated soon after it is inserted: its card's ts once the card is posted, and for a run with steps
its leases and states. Migration 0009 left a fifth of each page free; measured with runs of a 2 KB webhook
(about 550 bytes a row), that kept only 32 % of the card-ts updates on their page. The others wrote the row's new
version on another page and a new entry in each of the table's five full indexes: 25 µs and 770 bytes of WAL per
run. With half of each page free every one of them stays on its page (a heap-only update, no index entry):
10 µs and about 100 bytes of WAL. The table did not grow for it (3,746 pages against 4,096 for the same
26,000 runs): the old versions are pruned on their page instead of filling others.

Only pages written from now on are filled to half; stored ones stay as they are (nothing is rewritten). SQLite
has no fillfactor: nothing changes there.
"""

from __future__ import annotations

from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def _set_fillfactor(percent: int) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE runs SET (fillfactor = {percent})")


def upgrade() -> None:
    _set_fillfactor(50)


def downgrade() -> None:
    _set_fillfactor(80)
