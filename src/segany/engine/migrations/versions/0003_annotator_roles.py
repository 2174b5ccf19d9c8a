"""Annotator roles: ``annotator`` (the default for new users), ``reviewer`` and ``admin``.

Every annotator that existed before roles had full rights (review anyone's masks, change the project), so
the upgrade makes them ``admin``: nobody is locked out, and an admin narrows roles afterwards with
``segany project set-role``. New rows, from the store or plain SQL, get ``annotator``.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


# One ALTER TABLE ... ADD COLUMN, not Alembic's batch mode: on SQLite batch mode copies the table and drops the
# old one, and with foreign keys on, dropping ``annotators`` sets every ``annotations.annotator_id`` to NULL.
# SQLite and PostgreSQL both take a column CHECK in ADD COLUMN.
def upgrade() -> None:
    op.execute("ALTER TABLE annotators ADD COLUMN role VARCHAR(16) DEFAULT 'annotator' NOT NULL "
               "CONSTRAINT ck_annotators_role CHECK (role IN ('annotator', 'reviewer', 'admin'))")
    op.execute("UPDATE annotators SET role = 'admin'")  # the users from before roles keep their full rights


def downgrade() -> None:
    op.execute("ALTER TABLE annotators DROP COLUMN role")  # SQLite >= 3.35; the column's CHECK goes with it
