"""The platform core without HTTP: typed kinds, the service Context and the write layer (audit + idempotency)."""

from __future__ import annotations

import msgspec
import pytest

from minicloud import errors
from minicloud.compute.keypairs import import_keypair
from minicloud.compute.kinds import KEYPAIR, KeyPairSpec
from minicloud.core import crud
from minicloud.core.context import Context, Idempotency
from minicloud.core.kinds import Kind, NoStatus, declare, default_render
from minicloud.iam.keystore import KeyStore
from minicloud.model import KeyPair, KeyPairCreate, KeyPairUpdate
from minicloud.state import SQLiteStore

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb0i3x4n2wq0c2m2jG5Zb1m8D8o8Y5c8mQXW5H5Kc2d me@laptop"


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


def body(name: str = "laptop", **kw: object) -> KeyPairCreate:
    return KeyPairCreate(name=name, public_key=kw.pop("public_key", ED25519), **kw)  # type: ignore[arg-type]


async def audit_entries(store: SQLiteStore) -> list:
    return await store.list("audit", project=None, limit=1000)


def test_a_record_loads_into_its_kinds_types_and_dumps_back_unchanged():
    obj = KEYPAIR.new(
        project="p", name="k", spec=KeyPairSpec(type="ssh-ed25519", fingerprint="SHA256:x", public_key="k")
    )
    record = KEYPAIR.dump(obj.replace(revision=7))
    assert record.spec == {
        "type": "ssh-ed25519",
        "fingerprint": "SHA256:x",
        "public_key": "k",
        "comment": "",
        "description": "",
    }
    assert KEYPAIR.load(record) == obj.replace(revision=7)
    # Fields a newer version stored are ignored by an older reader (forward compatible), defaults fill the missing.
    record.spec = {"type": "t", "fingerprint": "f", "public_key": "k", "future": 1}
    assert KEYPAIR.load(record).spec == KeyPairSpec(type="t", fingerprint="f", public_key="k")


def test_the_default_view_takes_common_spec_and_status_fields_the_view_declares():
    obj = KEYPAIR.new(project="p", name="k", spec=KeyPairSpec(type="t", fingerprint="f", public_key="pk", comment="c"))
    view = default_render(KeyPair, obj)
    assert isinstance(view, KeyPair)
    assert (view.id, view.name, view.type, view.comment, view.public_key) == (obj.id, "k", "t", "c", "pk")


def test_a_kind_is_declared_once():
    class Spec(msgspec.Struct):
        x: int = 0

    with pytest.raises(ValueError, match="declared twice"):
        declare(Kind(name=KEYPAIR.name, plural="other", prefix="o", spec=Spec, status=NoStatus))


async def test_a_service_called_without_http_writes_its_audit_entry_in_the_same_transaction(store):
    ctx = Context.system("test", project="default", action="compute:keypairs:create")
    written = await import_keypair(ctx, store, body())
    assert written.status == 201 and written.body.name == "laptop" and written.body.revision == written.revision
    entries = await audit_entries(store)
    assert [(e.spec["principal"], e.spec["action"], e.spec["target"]["id"]) for e in entries] == [
        ("system:test", "compute:keypairs:create", written.body.id)
    ]
    assert entries[0].revision == written.revision  # one transaction: the change and its entry


async def test_an_idempotency_key_replays_the_first_answer_and_refuses_another_request(store, tmp_path):
    keys = KeyStore(tmp_path / "keys")
    idem = Idempotency(record_id="idem-1", fingerprint="f1", sealer=keys)
    ctx = Context.system("test", action="compute:keypairs:create")
    ctx_idem = Context(principal=ctx.principal, action=ctx.action, idempotency=idem)
    first = await import_keypair(ctx_idem, store, body())
    again = await import_keypair(ctx_idem, store, body())
    assert again.replayed and again.body["id"] == first.body.id and again.revision == first.revision
    assert len(await store.list(KEYPAIR.name, project="default")) == 1
    # The stored reply is sealed: the key pair's public key is not in the idempotency record in clear.
    stored = await store.get("idempotency", "idem-1")
    assert "body" not in stored.spec and ED25519.split()[1] not in msgspec.json.encode(stored.spec).decode()
    other = Context(principal=ctx.principal, idempotency=Idempotency(record_id="idem-1", fingerprint="f2", sealer=keys))
    with pytest.raises(errors.IdempotencyKeyReused):
        await import_keypair(other, store, body("other"))


async def test_generic_services_find_patch_and_delete_by_id_or_name_within_the_project(store):
    ctx = Context.system("test")
    created = (await import_keypair(ctx, store, body())).body
    elsewhere = Context.system("test", project="web")
    assert await crud.find(elsewhere, store, KEYPAIR, created.id) is None  # ids do not cross projects
    with pytest.raises(errors.NotFound, match="minicloud keypair list"):
        await crud.get(elsewhere, store, KEYPAIR, "laptop")
    patched = await crud.patch(ctx, store, KEYPAIR, "laptop", KeyPairUpdate(description="mine", labels={"a": "b"}))
    assert (patched.body.description, patched.body.labels, patched.body.comment) == ("mine", {"a": "b"}, "me@laptop")
    with pytest.raises(errors.PreconditionFailed):
        await crud.patch(ctx, store, KEYPAIR, created.id, KeyPairUpdate(description="x"), expect=created.revision)
    with pytest.raises(errors.PreconditionFailed):
        await crud.delete(ctx, store, KEYPAIR, "laptop", expect=created.revision)
    await crud.delete(ctx, store, KEYPAIR, "laptop", expect=patched.revision)
    assert await crud.find(ctx, store, KEYPAIR, "laptop") is None


async def test_a_delete_without_if_match_reads_again_when_a_status_change_lands_between_its_read_and_write(store):
    ctx = Context.system("test")
    await import_keypair(ctx, store, body())
    commit, raced = store.commit, []

    async def racing_commit(txn):  # a reconciler's write lands just before the delete's transaction, twice
        if any(type(op).__name__ == "Delete" for op in txn.ops) and len(raced) < 2:
            raced.append(await crud.patch(ctx, store, KEYPAIR, "laptop", KeyPairUpdate(description=f"r{len(raced)}")))
        return await commit(txn)

    store.commit = racing_commit
    await crud.delete(ctx, store, KEYPAIR, "laptop")  # no If-Match: no 412 for a revision the caller never sent
    assert len(raced) == 2 and await crud.find(ctx, store, KEYPAIR, "laptop") is None
    await import_keypair(ctx, store, body())
    raced.clear()
    with pytest.raises(errors.PreconditionFailed):  # with If-Match the caller's revision stands
        await crud.delete(
            ctx, store, KEYPAIR, "laptop", expect=(await crud.get(ctx, store, KEYPAIR, "laptop")).revision
        )
    assert await crud.find(ctx, store, KEYPAIR, "laptop") is not None


async def test_list_pages_walk_every_object_once(store):
    ctx = Context.system("test")
    for i in range(7):
        await crud.create(
            ctx,
            store,
            KEYPAIR,
            KEYPAIR.new(project="default", name=f"k{i}", spec=KeyPairSpec(type="t", fingerprint="f", public_key="p")),
        )
    seen, cursor = [], None
    while True:
        page = await crud.list_objects(ctx, store, KEYPAIR, limit=3, cursor=cursor)
        seen += [o.name for o in page.items]
        if not (cursor := page.next_cursor):
            break
    assert seen == [f"k{i}" for i in range(7)]
