from __future__ import annotations

from typing import Any

import msgspec
import pytest

from minicloud.compute.kinds import IMAGE, INSTANCE, ImageSpec, InstanceSpec
from minicloud.core.context import Context, SystemCaller
from minicloud.state import Create, SQLiteStore, Store, Txn, Update

NODE = "n1"


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


def ctx_of(project: str = "default", *, admin: bool = True) -> Context:
    return Context(principal=SystemCaller("tester", admin=admin), project=project, action="storage:test")


@pytest.fixture
def ctx() -> Context:
    return ctx_of()


async def set_status(store: Store, kind: Any, id_: str, **changes: Any) -> Any:
    """What a node does: write the record's status (CAS)."""
    obj = kind.load(await store.get(kind.name, id_))
    new = obj.replace(status=msgspec.structs.replace(obj.status, **changes))
    await store.commit(Txn([Update(kind.dump(new), expect_revision=obj.revision)]))
    return new


async def put_instance(store: Store, name: str, *, node: str = NODE, project: str = "default", **spec: Any) -> Any:
    obj = INSTANCE.new(
        project=project,
        name=name,
        spec=InstanceSpec(
            uuid=name, image_id="img-x", image_name="x", type="t", vcpus=1, memory_mib=64, disk_gib=1, node=node,
            **spec,
        ),
    )  # fmt: skip
    await store.commit(Txn([Create(INSTANCE.dump(obj))]))
    return obj


async def put_image(store: Store, name: str, *, virtual: int, node: str = NODE, **spec: Any) -> Any:
    obj = IMAGE.new(
        project="default",
        name=name,
        spec=ImageSpec(boot="disk", size_bytes=virtual // 4, virtual_size_bytes=virtual, sha256="x", node=node, **spec),
    )
    await store.commit(Txn([Create(IMAGE.dump(obj))]))
    return obj
