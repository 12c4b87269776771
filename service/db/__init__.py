"""Persistence: sqlmodel tables, the engine/session factory, and Alembic migrations (applied at start)."""
