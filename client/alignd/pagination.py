"""Cursor pages (``?limit=&after=``, ``has_more``) that iterate across every page on their own.

``for model in client.models.list(): ...`` walks all pages; ``page.data`` / ``page.has_more`` /
``page.next_page()`` give page-by-page control. The async form: ``async for m in client.models.list()``
or ``page = await client.models.list()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T", bound=BaseModel)

__all__ = ["AsyncPage", "AsyncPaginator", "SyncPage"]


def _cursor(data: list[Any]) -> str | None:
    if not data:
        return None
    last = data[-1]
    return getattr(last, "id", None)


class SyncPage(Generic[T]):
    def __init__(self, *, data: list[T], has_more: bool, fetch: Callable[[str], SyncPage[T]]) -> None:
        self.data = data
        self.has_more = has_more
        self._fetch = fetch

    def __repr__(self) -> str:
        return f"SyncPage(len={len(self.data)}, has_more={self.has_more})"

    def has_next_page(self) -> bool:
        return self.has_more and _cursor(self.data) is not None

    def next_page(self) -> SyncPage[T] | None:
        cursor = _cursor(self.data)
        if not self.has_more or cursor is None:
            return None
        return self._fetch(cursor)

    def iter_pages(self) -> Iterator[SyncPage[T]]:
        page: SyncPage[T] | None = self
        while page is not None:
            yield page
            page = page.next_page()

    def __iter__(self) -> Iterator[T]:
        for page in self.iter_pages():
            yield from page.data

    def to_list(self) -> list[T]:
        """Every item of every page."""
        return list(self)


class AsyncPage(Generic[T]):
    def __init__(
        self, *, data: list[T], has_more: bool, fetch: Callable[[str], Awaitable[AsyncPage[T]]]
    ) -> None:
        self.data = data
        self.has_more = has_more
        self._fetch = fetch

    def __repr__(self) -> str:
        return f"AsyncPage(len={len(self.data)}, has_more={self.has_more})"

    def has_next_page(self) -> bool:
        return self.has_more and _cursor(self.data) is not None

    async def next_page(self) -> AsyncPage[T] | None:
        cursor = _cursor(self.data)
        if not self.has_more or cursor is None:
            return None
        return await self._fetch(cursor)

    async def iter_pages(self) -> AsyncIterator[AsyncPage[T]]:
        page: AsyncPage[T] | None = self
        while page is not None:
            yield page
            page = await page.next_page()

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.iter_pages():
            for item in page.data:
                yield item

    async def to_list(self) -> list[T]:
        return [item async for item in self]


class AsyncPaginator(Generic[T]):
    """What async ``list()`` returns: ``await`` it for the first page, or ``async for`` over every item."""

    def __init__(self, first: Callable[[], Awaitable[AsyncPage[T]]]) -> None:
        self._first = first

    def __await__(self) -> Generator[Any, None, AsyncPage[T]]:
        return self._first().__await__()

    async def __aiter__(self) -> AsyncIterator[T]:
        page = await self._first()
        async for item in page:
            yield item

    async def to_list(self) -> list[T]:
        return [item async for item in self]
