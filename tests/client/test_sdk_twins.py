"""``alignd.Client`` and ``alignd.AsyncClient`` keep one surface: the same resources, the same public methods,
the same parameters (names, kinds, defaults, annotations), and the per-call request options on every method
that talks to the server.

Signatures are read with ``inspect`` from the classes themselves, so a parameter added to one twin only (or
a method, or a resource) fails here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import alignd
import pytest
from alignd.resources._resource import AsyncResource, SyncResource

# The sync return annotation each async twin returns instead (other annotations must be equal).
ASYNC_RETURNS = {"SyncPage": "AsyncPaginator", "Iterator": "AsyncIterator"}
# Every method that makes a request takes these, keyword-only, defaulting to None.
REQUEST_OPTIONS = ("extra_headers", "extra_query", "extra_body", "timeout")
# Methods that send nothing to the server.
LOCAL_ONLY = {("datasets", "validate")}
# jobs.wait's ``timeout`` is its overall deadline (it polls many requests); the per-request one is renamed.
RENAMED_OPTIONS = {("jobs", "wait"): {"timeout": "request_timeout"}}


def _resources(client: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every resource reachable from ``client`` (nested ones too), as (dotted name, resource)."""
    for name, value in sorted(vars(client).items()):
        if isinstance(value, SyncResource | AsyncResource):
            dotted = f"{prefix}{name}"
            yield dotted, value
            yield from _resources(value, f"{dotted}.")


def _methods(resource: object) -> dict[str, Callable[..., Any]]:
    cls = type(resource)
    return {
        name: inspect.getattr_static(cls, name)
        for name in dir(cls)
        if not name.startswith("_") and callable(getattr(resource, name))
    }


def _unwrap(member: Any) -> Callable[..., Any]:
    return member.__func__ if isinstance(member, staticmethod | classmethod) else member


def _return_for_async(annotation: Any) -> Any:
    if not isinstance(annotation, str):
        return annotation
    head, sep, tail = annotation.partition("[")
    return ASYNC_RETURNS.get(head, head) + sep + tail


@pytest.fixture(scope="module")
def twins() -> Iterator[tuple[dict[str, object], dict[str, object]]]:
    # No request is made: constructing a client opens no connection.
    sync = alignd.Client(base_url="http://127.0.0.1:9")
    asyn = alignd.AsyncClient(base_url="http://127.0.0.1:9")
    yield dict(_resources(sync)), dict(_resources(asyn))
    sync.close()


def _pairs(twins: tuple[dict[str, object], dict[str, object]]) -> Iterator[tuple[str, str, Any, Any]]:
    sync, asyn = twins
    for resource in sorted(sync):
        sync_methods, async_methods = _methods(sync[resource]), _methods(asyn[resource])
        for name in sorted(sync_methods):
            yield resource, name, _unwrap(sync_methods[name]), _unwrap(async_methods[name])


def test_the_same_resources(twins: tuple[dict[str, object], dict[str, object]]) -> None:
    sync, asyn = twins
    assert set(sync) == set(asyn)
    assert {"models", "datasets", "jobs", "artifacts", "feedback_sets"} <= set(sync)
    for resource in sync:
        assert isinstance(sync[resource], SyncResource)
        assert isinstance(asyn[resource], AsyncResource)


def test_the_same_public_methods(twins: tuple[dict[str, object], dict[str, object]]) -> None:
    sync, asyn = twins
    for resource in sync:
        assert sorted(_methods(sync[resource])) == sorted(_methods(asyn[resource])), resource


def test_the_same_parameters(twins: tuple[dict[str, object], dict[str, object]]) -> None:
    mismatches = []
    for resource, name, sync_fn, async_fn in _pairs(twins):
        sync_params = list(inspect.signature(sync_fn).parameters.values())
        async_params = list(inspect.signature(async_fn).parameters.values())
        described = [(p.name, p.kind, p.default, p.annotation) for p in sync_params]
        if described != [(p.name, p.kind, p.default, p.annotation) for p in async_params]:
            mismatches.append(
                f"{resource}.{name}: {inspect.signature(sync_fn)} != {inspect.signature(async_fn)}"
            )
    assert not mismatches, "\n".join(mismatches)


def test_async_twins_await_or_iterate_where_sync_ones_return(
    twins: tuple[dict[str, object], dict[str, object]],
) -> None:
    for resource, name, sync_fn, async_fn in _pairs(twins):
        where = f"{resource}.{name}"
        sync_returns = inspect.signature(sync_fn).return_annotation
        async_returns = inspect.signature(async_fn).return_annotation
        assert async_returns == _return_for_async(sync_returns), where
        if inspect.isgeneratorfunction(sync_fn):
            assert inspect.isasyncgenfunction(async_fn), f"{where}: a generator's twin is an async generator"
        elif isinstance(sync_returns, str) and sync_returns.startswith("SyncPage"):
            # list() stays a plain function: its AsyncPaginator is awaited (first page) or iterated.
            assert not inspect.iscoroutinefunction(async_fn), where
        elif (resource, name) in LOCAL_ONLY:
            assert not inspect.iscoroutinefunction(async_fn), f"{where} does no I/O"
        else:
            assert inspect.iscoroutinefunction(async_fn), f"{where} must be `async def`"


def test_every_request_method_takes_the_per_call_options(
    twins: tuple[dict[str, object], dict[str, object]],
) -> None:
    missing = []
    for resource, name, sync_fn, _ in _pairs(twins):
        if (resource, name) in LOCAL_ONLY:
            continue
        params = inspect.signature(sync_fn).parameters
        renamed = RENAMED_OPTIONS.get((resource, name), {})
        for option in REQUEST_OPTIONS:
            param = params.get(renamed.get(option, option))
            if param is None or param.kind is not inspect.Parameter.KEYWORD_ONLY or param.default is not None:
                missing.append(f"{resource}.{name}: {renamed.get(option, option)}")
    assert not missing, "keyword-only, default None, missing or wrong on:\n" + "\n".join(missing)
