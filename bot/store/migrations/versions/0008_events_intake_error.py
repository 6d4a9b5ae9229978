"""events: why an event was set aside instead of starting runs

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 14:05:00.000000

An event that makes the intake fail on its own (a bug met by one payload) used to fail its whole batch, again
and again, and with it every event stored after it: nothing started until the process was fixed. The intake
now takes such a batch one event at a time and sets the failing event aside: `processed_at` is set, so the
others go on, and `intake_error` says why. `relaybot events retry` puts it back in the inbox.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('intake_error', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_column('intake_error')
