"""pending events: a partial index on id

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 23:40:00.000000

The intake takes the oldest pending events (`WHERE processed_at IS NULL ORDER BY id LIMIT n`). With an index on
(processed_at, id) PostgreSQL, whose statistics lag behind a burst, read every pending event, sorted them all
(on disk, payloads included) and kept n: 30-40 ms per batch once 10,000 events waited. An index holding only the
pending events' ids is walked in order and left after n entries, and it stays as small as the backlog.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

PENDING = sa.text("processed_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_pending')
        batch_op.create_index('ix_events_pending', ['id'], unique=False, postgresql_where=PENDING,
                              sqlite_where=PENDING)


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_pending')
        batch_op.create_index('ix_events_pending', ['processed_at', 'id'], unique=False)
