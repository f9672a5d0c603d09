"""Alembic's entry point for the job store: the URL comes from the caller (``store.migrate``), the
tables from ``store.Base`` (for ``alembic revision --autogenerate`` when the models change)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from tunesmith.server.store import Base

url = context.config.get_main_option("sqlalchemy.url")
if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url)
    with engine.connect() as connection:
        # render_as_batch: SQLite alters a table by copying it; Alembic's batch mode does that.
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
