"""runs: indexes for the App Home tab and the runs-active gauge

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 01:30:00.000000

The Home tab's three queries (the last run of each enabled workflow in its channel, the runs waiting for a
decision, the latest runs) and the `relaybot_runs_active` gauge grouped or sorted every run the workspace ever
had: 157 + 71 + 24 ms on each opening of the tab and 16 ms per scrape at 200,000 runs on SQLite, growing with the
table (run rows are kept after retention). Each is now one short index range.
"""

from __future__ import annotations

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index('ix_runs_state', ['state', 'team_id', 'created_at'], unique=False)
        batch_op.create_index('ix_runs_team_created', ['team_id', 'created_at'], unique=False)
        batch_op.create_index('ix_runs_team_workflow', ['team_id', 'workflow', 'channel_id', 'created_at'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_team_workflow')
        batch_op.drop_index('ix_runs_team_created')
        batch_op.drop_index('ix_runs_state')
