"""events: webhook payloads compressed with lz4 on PostgreSQL

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 00:40:00.000000

PostgreSQL compresses a row's large values before storing them, with pglz unless told otherwise. A webhook
payload is stored once per delivery, before the `202`, so that compression is on the door's path: for the ~2 KB
pull-request body of the benchmark, inserting 20,000 rows took 463 ms with pglz and 209 ms with lz4 on the
2-core machine (GitHub's real payloads are often ten times as large). lz4 is used where the server was built
with it (PostgreSQL 14 and later, the usual packages); elsewhere, and on SQLite, nothing changes. Rows stored
before keep their pglz values, which PostgreSQL still reads.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

_LZ4_AVAILABLE = sa.text("SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
                         "AND 'lz4' = ANY(enumvals)")


def _set_compression(method: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or bind.execute(_LZ4_AVAILABLE).first() is None:
        return
    op.execute(f"ALTER TABLE events ALTER COLUMN payload SET COMPRESSION {method}")


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("pglz")
