"""Alembic migrations of the job store (store.py); `store.migrate(url)` applies them."""
