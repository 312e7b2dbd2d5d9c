"""Alembic environment. The store hands us an open connection (see `apps.store.migrate`); there is no ini file."""

from __future__ import annotations

from alembic import context

from apps.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `mmcore db upgrade` or apps.store.migrate, which pass a connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite has almost no ALTER: move-and-copy instead
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
