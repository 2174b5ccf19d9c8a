"""Who reviewed an annotation, kept apart from who made it: ``annotations.reviewer_id`` and ``reviewed_at``.

Before this, accepting or rejecting someone's annotation overwrote ``annotator_id`` with the reviewer's id,
so per-annotator figures, exports and retraining provenance credited the reviewer with the mask. Rows from
before the upgrade keep their (possibly already overwritten) ``annotator_id``; their reviewer is unknown
and stays NULL rather than guessed.

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


# Plain ALTER TABLE ... ADD COLUMN, as in 0003 and for the same reason: Alembic's SQLite batch mode rebuilds
# the table, and dropping the old ``annotations`` copy with foreign keys on loses rows' links. SQLite allows
# a column REFERENCES clause in ADD COLUMN when the column's default is NULL (SQLAlchemy's SQLite reflection
# then misses its ON DELETE, see tests/engine/test_engine_store.py); PostgreSQL names the constraint
# ``annotations_reviewer_id_fkey``. The timestamp type is what the ORM's DateTime is on this database.
def upgrade() -> None:
    timestamp = sa.DateTime().compile(dialect=op.get_bind().dialect)  # DATETIME on SQLite, TIMESTAMP on PostgreSQL
    op.execute("ALTER TABLE annotations ADD COLUMN reviewer_id INTEGER "
               "REFERENCES annotators (id) ON DELETE SET NULL")
    op.execute(f"ALTER TABLE annotations ADD COLUMN reviewed_at {timestamp}")


def downgrade() -> None:
    op.execute("ALTER TABLE annotations DROP COLUMN reviewed_at")
    op.execute("ALTER TABLE annotations DROP COLUMN reviewer_id")
