"""The project a metrics query or an alarm answers for: its id (what the query service enforces) and its name."""

from __future__ import annotations

from minicloud import errors
from minicloud.iam.tenancy import project_id_of
from minicloud.observe.query import ProjectScope
from minicloud.state import Store


async def project_scope(store: Store, name: str) -> ProjectScope:
    """The scope of the project named ``name`` now (``default`` has a fixed id and no record); 404 if there is none."""
    pid = await project_id_of(store, name)
    if pid is None:
        raise errors.NotFound(f"no project named '{name}'; see `minicloud project list`")
    return ProjectScope(id=pid, name=name)
