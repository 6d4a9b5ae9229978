"""outbox: the pending index holds only pending messages, and a second one finds a lane's pending messages

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 00:50:00.000000

`ix_outbox_pending` was on (state, id) over every message, sent ones included, and a message marked sent got a
new entry in it that nothing reads. Now it is on id, for pending messages only: the dispatcher's scan of the
oldest pending messages reads the same, and marking a message sent writes no entry in it.

The dispatcher's claims, lease renewals and releases, `/relay cancel` and a step's thread reply ask for the
pending messages of given lanes (`lane IN (…) AND state = 'pending'`). With no index on the lane, PostgreSQL read
every pending message for each of them: 2 ms per claim of 64 lanes with 10,000 messages waiting. The new
`ix_outbox_pending_lanes` (lane, id), pending messages only, answers them from the lanes' own entries.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_pending')
        batch_op.create_index('ix_outbox_pending', ['id'], unique=False, postgresql_where=PENDING,
                              sqlite_where=PENDING)
        batch_op.create_index('ix_outbox_pending_lanes', ['lane', 'id'], unique=False, postgresql_where=PENDING,
                              sqlite_where=PENDING)


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_pending_lanes')
        batch_op.drop_index('ix_outbox_pending')
        batch_op.create_index('ix_outbox_pending', ['state', 'id'], unique=False)
