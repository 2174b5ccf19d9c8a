"""Alembic migrations of the data-engine store; applied by :func:`segany.engine.store.open_store`."""
