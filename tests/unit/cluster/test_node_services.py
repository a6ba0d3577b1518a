"""The cluster's record services without etcd: join tokens, admission, removal and liveness write typed ``node`` and
``jointoken`` records through the write layer (audit in the same transaction, idempotent replays sealed)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from minicloud import errors, ids
from minicloud.api.accesskeys import KEYSTORE
from minicloud.api.keys import CLUSTER
from minicloud.cluster import join as joinlib
from minicloud.cluster.kinds import JOINTOKEN, NODE
from minicloud.cluster.node import ClusterNode, ClusterState
from minicloud.core.context import Context, Idempotency
from minicloud.state.etcd_client import EtcdError
from tests.unit.api.conftest import make_config, start_api

PEER = "https://10.0.0.2:2380"


class FakeEtcd:
    """The few membership calls admission and liveness make."""

    def __init__(self) -> None:
        self.members = [{"ID": 1, "name": "n1", "peerURLs": ["https://10.0.0.1:2380"], "clientURLs": ["c1"]}]
        self.refuse_add = False

    async def member_list(self) -> list[dict]:
        return self.members

    async def member_add(self, peer_urls: list[str], learner: bool = False) -> dict:
        if self.refuse_add:
            raise EtcdError("etcdserver: re-configuration failed")
        self.members = [*self.members, {"ID": 2, "name": "", "peerURLs": peer_urls, "isLearner": learner}]
        return {"members": self.members}


@pytest.fixture
async def api(tmp_path):
    a = await start_api(make_config(tmp_path))
    yield a
    await a.client.close()


@pytest.fixture
def keystore(api):
    return api.app[KEYSTORE]


@pytest.fixture
async def cluster(api):
    node: ClusterNode = api.app[CLUSTER]
    node.state = ClusterState(
        node="n1",
        address="10.0.0.1",
        client_url="https://10.0.0.1:2379",
        peer_url="https://10.0.0.1:2380",
        endpoints=["https://10.0.0.1:2379"],
        initial_cluster={"n1": "https://10.0.0.1:2380"},
        initial_state="existing",
    )
    node.client = FakeEtcd()  # type: ignore[assignment]
    node._https_port = lambda: 8443  # type: ignore[method-assign]  # the test API listens on port 0
    yield node
    node.state = None  # nothing to stop: no etcd member, no loops
    node.client = None


def ctx(**kw) -> Context:
    return dataclasses.replace(Context.system("test", project=""), **kw)


async def audit_targets(store) -> list[dict]:
    return [r.spec.get("target") for r in await store.list("audit", project=None, limit=1000)]


async def admit(node: ClusterNode, token: str, name: str = "n2", https: str = ""):
    _, csr = joinlib.make_node_key_and_csr(name, ["10.0.0.2"])
    return await node.admit(
        ctx(), token, csr.decode(), name, ids.now(), PEER, "https://10.0.0.2:2379", "10.0.0.2", https
    )


async def test_a_join_token_is_a_typed_record_without_its_secret_and_its_creation_is_audited(cluster):
    written = await cluster.issue_token(ctx(), "n2", "learner", 600, "rack-2")
    assert written.status == 201 and written.body.node == "n2"
    secret = joinlib.parse_token(written.body.token).secret
    [record] = await cluster.store.list(JOINTOKEN.name, limit=10)
    token = JOINTOKEN.load(record)
    assert (token.spec.node, token.spec.role, token.spec.zone) == ("n2", "learner", "rack-2")
    assert token.spec.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest() and secret not in str(record)
    assert {"kind": JOINTOKEN.name, "id": token.id, "name": token.id} in await audit_targets(cluster.store)


async def test_a_token_request_repeated_with_its_idempotency_key_replays_the_first_token(cluster, keystore):
    keyed = ctx(idempotency=Idempotency("idem-t1", "fp", keystore))
    first = await cluster.issue_token(keyed, "n2", "auto", 600)
    again = await cluster.issue_token(keyed, "n2", "auto", 600)
    assert again.replayed and again.body["token"] == first.body.token
    assert len(await cluster.store.list(JOINTOKEN.name, limit=10)) == 1


async def test_admission_consumes_the_token_and_registers_the_node_once(cluster):
    issued = await cluster.issue_token(ctx(), "n2", "voter", 600, "rack-2")
    written = await admit(cluster, issued.body.token)
    assert written.body.role == "voter" and written.body.certificate.startswith("-----BEGIN CERTIFICATE")
    assert await cluster.store.list(JOINTOKEN.name, limit=10) == []
    node = NODE.load(await cluster.store.get_by_name(NODE.name, "", "n2"))
    assert (node.spec.address, node.spec.role, node.labels) == ("10.0.0.2", "voter", {"zone": "rack-2"})
    assert {"kind": NODE.name, "id": node.id, "name": "n2"} in await audit_targets(cluster.store)
    with pytest.raises(joinlib.JoinTokenInvalid):  # one-time
        await admit(cluster, issued.body.token)


async def test_a_joined_node_is_recorded_with_its_https_url_which_must_name_its_own_address(cluster):
    # Other nodes reach a joined node's API (metrics scrapes, log and query forwarding) at the recorded URL.
    issued = await cluster.issue_token(ctx(), "n2", "voter", 600)
    for bad in ("https://10.0.0.9:8443", "http://10.0.0.2:8443", "https://10.0.0.2:0", "https://10.0.0.2:x/"):
        with pytest.raises(errors.ValidationFailed, match=r"https must be https://10\.0\.0\.2:PORT"):
            await admit(cluster, issued.body.token, https=bad)
    assert len(await cluster.store.list(JOINTOKEN.name, limit=10)) == 1  # nothing consumed by a refused request
    await admit(cluster, issued.body.token, https="https://10.0.0.2:8443")
    node = NODE.load(await cluster.store.get_by_name(NODE.name, "", "n2"))
    assert node.spec.https == "https://10.0.0.2:8443"


async def test_a_failed_etcd_member_add_gives_the_token_back(cluster):
    issued = await cluster.issue_token(ctx(), "n2", "voter", 600)
    cluster.client.refuse_add = True  # type: ignore[union-attr]
    with pytest.raises(errors.Unavailable):
        await admit(cluster, issued.body.token)
    assert await cluster.store.get_by_name(NODE.name, "", "n2") is None
    assert len(await cluster.store.list(JOINTOKEN.name, limit=10)) == 1
    cluster.client.refuse_add = False  # type: ignore[union-attr]
    assert (await admit(cluster, issued.body.token)).body.role == "voter"  # the operator retries with it


async def test_a_token_for_a_node_already_in_the_cluster_is_refused(cluster):
    await admit(cluster, (await cluster.issue_token(ctx(), "n2", "voter", 600)).body.token)
    with pytest.raises(errors.AlreadyExists):
        await cluster.issue_token(ctx(), "n2", "voter", 600)


async def test_liveness_transitions_are_typed_status_writes_and_members_read_them(cluster):
    await admit(cluster, (await cluster.issue_token(ctx(), "n2", "voter", 600)).body.token)
    live = {"n2": {"since": "2026-01-01T00:00:00.000Z"}}

    async def fake_live():
        return live

    async def no_replacements(_live):
        return None

    cluster._live = fake_live  # type: ignore[method-assign]
    cluster._replace_lost_voters = no_replacements  # type: ignore[method-assign]
    await cluster.track_liveness()
    node = NODE.load(await cluster.store.get_by_name(NODE.name, "", "n2"))
    assert (node.status.state, node.status.since) == ("online", "2026-01-01T00:00:00.000Z")
    live.clear()
    await cluster.track_liveness()
    node = NODE.load(await cluster.store.get_by_name(NODE.name, "", "n2"))
    assert node.status.state == "offline" and node.status.last_contact
    [member] = [m for m in await cluster.members() if m.name == "n2"]
    assert (member.status, member.zone, member.last_contact) == ("offline", "", node.status.last_contact)


async def test_removing_a_node_deletes_its_record_with_an_audit_entry(cluster):
    await admit(cluster, (await cluster.issue_token(ctx(), "n2", "voter", 600)).body.token)
    cluster.client.members = cluster.client.members[:1]  # type: ignore[union-attr]  # not an etcd member any more

    async def no_delete(key):
        return None

    cluster.client.delete = no_delete  # type: ignore[union-attr]
    node = await cluster.store.get_by_name(NODE.name, "", "n2")
    written = await cluster.remove(ctx(), "n2")
    assert written is not None and written.status == 204
    assert await cluster.store.get_by_name(NODE.name, "", "n2") is None
    assert {"kind": NODE.name, "id": node.id} in await audit_targets(cluster.store)
    with pytest.raises(errors.NotFound):
        await cluster.remove(ctx(), "n2")
