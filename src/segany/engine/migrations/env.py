"""Alembic environment: run migrations on the connection the store hands over.

The store calls Alembic programmatically (``config.attributes["connection"]``), so no alembic.ini
is needed; ``alembic -x url=...`` from a shell also works for maintenance.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from segany.engine.db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables so later migrations work on both backends.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
