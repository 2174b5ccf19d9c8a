"""Mask areas are 64-bit: ``annotations.area`` and ``dataset_version_items.area`` become BIGINT on PostgreSQL.

They were INTEGER, which PostgreSQL stores in 32 bits, so saving the mask of a gigapixel image (a 60,000 x
60,000 sky covers 3.6e9 pixels; images that large are allowed with SEGANY_MAX_IMAGE_PIXELS) failed with
"integer out of range". SQLite's INTEGER holds 64 bits already, so SQLite stores are left as they are (a table
rebuild there would only copy every annotation); their version number still moves to 0007.

On PostgreSQL the ALTER rewrites both tables under an exclusive lock: a store with millions of annotations
takes a while to upgrade, during which nothing else can use those tables.

Revision ID: 0007
Revises: 0006
Create Date: 2025-01-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_COLUMNS = (("annotations", "area"), ("dataset_version_items", "area"))


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in _COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in _COLUMNS:  # fails, as it should, if an area above 2**31 - 1 is stored
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
