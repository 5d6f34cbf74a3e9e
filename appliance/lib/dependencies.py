"""Route dependencies resolved one after the other, in the handler's own task.

Litestar resolves the dependencies a handler asks for at one level of its dependency graph concurrently: one
task each, in an anyio task group (``litestar/_kwargs/kwargs_model.py``). That only pays when a provider awaits
something slow. Every provider of this app is synchronous and cached (a collaborator made at start, or the
principal the authentication middleware left in the scope), so the tasks are pure cost: measured on Litestar
2.25, a handler with two dependencies took 106 us per request where one with a single dependency took 35 us,
and one with six 166 us. A `/v1` handler has two (the principal and the serving), the sign-in route eight.

:func:`resolve_in_order` replaces that method with one that resolves each level's dependencies in turn (the
levels still in order, so a dependency still sees the ones it depends on). It changes what Litestar does for
every app in the process, so :func:`appliance.asgi.create_app` calls it; tests/unit/lib/test_dependencies.py
fails if a Litestar upgrade moves the method away or brings the tasks back.
"""

from __future__ import annotations

from typing import Any

from litestar._kwargs.cleanup import DependencyCleanupGroup
from litestar._kwargs.dependencies import resolve_dependency
from litestar._kwargs.kwargs_model import KwargsModel
from litestar.connection import ASGIConnection


async def _resolve_in_order(
    self: KwargsModel, connection: ASGIConnection[Any, Any, Any, Any], kwargs: dict[str, Any]
) -> DependencyCleanupGroup:
    cleanup_group = DependencyCleanupGroup()
    for batch in self.dependency_batches:
        for dependency in batch:
            await resolve_dependency(dependency, connection, kwargs, cleanup_group)
    return cleanup_group


def resolve_in_order() -> None:
    """From now on, every Litestar app of this process resolves route dependencies in the handler's task."""
    KwargsModel.resolve_dependencies = _resolve_in_order  # type: ignore[method-assign]
