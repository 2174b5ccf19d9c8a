"""Edits are safe to retry: ``annotations.last_edit_uuid``, the client's key of the edit that made the revision.

An edit (``PATCH /api/annotations/{id}``) carries the revision it began from, so an edit of a version someone
else has changed since is refused (409). A retry of an edit whose answer was lost (stored, but the network
dropped the answer) met its own new revision and was refused as stale too. The edit's key is now kept with the
revision it made: the same key again, while nothing else changed the annotation, is answered with the row as
that edit left it.

Rows from before the upgrade have no key (NULL): their last edit cannot be replayed, which only matters for an
answer lost during the upgrade.

Revision ID: 0008
Revises: 0007
Create Date: 2025-01-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


# A plain ALTER TABLE ... ADD COLUMN on both databases (no batch mode: see 0004), nullable without a default, so
# PostgreSQL adds it without rewriting the table and SQLite without a table rebuild.
def upgrade() -> None:
    op.add_column("annotations", sa.Column("last_edit_uuid", sa.String(36), nullable=True))


def downgrade() -> None:
    op.drop_column("annotations", "last_edit_uuid")
