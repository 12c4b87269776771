"""The Alembic migrations build exactly the tables service/db/tables.py declares: a column added to a table
class without its migration (or the reverse) fails here, not on a production upgrade."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import service.db.tables  # noqa: F401  (registers every table on SQLModel.metadata)
from service.db.session import make_engine, migrate


def test_a_migrated_database_has_no_difference_from_the_table_classes(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'schema.db'}")
    migrate(engine)
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    finally:
        engine.dispose()
    assert differences == []
