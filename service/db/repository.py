"""The queries every resource's routes share: a tenant's row by id, and newest-first cursor pages.

Another tenant's id is indistinguishable from a missing one everywhere: both are "not found".
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from sqlmodel import Session, SQLModel, col, select

from service.core.errors import NotFoundError, ValidationFailed

RowT = TypeVar("RowT", bound=SQLModel)


class PageRequest(Protocol):
    """A page of a list: at most ``limit`` rows after the row whose id is ``after`` (None: from the top)."""

    limit: int
    after: str | None


def find_owned(session: Session, table: type[RowT], resource_id: str, tenant: str) -> RowT | None:
    """The tenant's row with this id, or None."""
    return session.exec(
        select(table).where(table.id == resource_id, table.tenant == tenant)  # type: ignore[attr-defined]
    ).first()


def get_owned(session: Session, table: type[RowT], resource_id: str, tenant: str, kind: str) -> RowT:
    """The tenant's row with this id; raises NotFoundError (404) naming ``kind`` otherwise."""
    row = find_owned(session, table, resource_id, tenant)
    if row is None:
        raise NotFoundError.for_resource(kind, resource_id)
    return row


def paginate(
    session: Session,
    statement: Any,
    table: type[RowT],
    page: PageRequest,
    tenant: str,
    *,
    ascending: bool = False,
) -> tuple[list[RowT], bool]:
    """Newest first (oldest first when ``ascending``); ``after`` is the last id of the previous page. Fetch one
    extra row to set has_more."""
    seq = col(table.seq)  # type: ignore[attr-defined]
    if page.after is not None:
        cursor = session.exec(
            select(seq).where(table.id == page.after, table.tenant == tenant)  # type: ignore[attr-defined]
        ).first()
        if cursor is None:
            raise ValidationFailed(f"Unknown cursor 'after={page.after}'.", code="invalid_cursor")
        statement = statement.where(seq > cursor if ascending else seq < cursor)
    order = seq.asc() if ascending else seq.desc()
    rows = list(session.exec(statement.order_by(order).limit(page.limit + 1)).all())
    return rows[: page.limit], len(rows) > page.limit


def list_owned(
    session: Session, table: type[RowT], page: PageRequest, tenant: str, **equal: Any
) -> tuple[list[RowT], bool]:
    """A newest-first page of the tenant's rows; each ``column=value`` whose value is not None filters it."""
    statement = select(table).where(table.tenant == tenant)  # type: ignore[attr-defined]
    for column, value in equal.items():
        if value is not None:
            statement = statement.where(getattr(table, column) == value)
    return paginate(session, statement, table, page, tenant)
