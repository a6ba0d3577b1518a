"""The project a metrics query or an alarm answers for: its id (what the query service enforces) and its name."""

from __future__ import annotations

from minicloud import errors
from minicloud.iam.kinds import PROJECT
from minicloud.iam.principals import DEFAULT_PROJECT, DEFAULT_PROJECT_ID
from minicloud.observe.query import ProjectScope
from minicloud.state import Store


async def project_scope(store: Store, name: str) -> ProjectScope:
    """The scope of the project named ``name`` now (``default`` has a fixed id and no record); 404 if there is none."""
    if name == DEFAULT_PROJECT:
        return ProjectScope(id=DEFAULT_PROJECT_ID, name=name)
    record = await store.get_by_name(PROJECT.name, "", name)
    if record is None:
        raise errors.NotFound(f"no project named '{name}'; see `minicloud project list`")
    return ProjectScope(id=record.id, name=name)
