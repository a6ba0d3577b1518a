"""The routers' plan for one network's service namespace on a node (pure: legs, floating IPs, static routes), and
the provider config."""

from __future__ import annotations

import ipaddress
import json

import msgspec
import pytest

from agent.net.router import (
    ExternalLeg,
    FakeRouterPlumbing,
    RouterPlan,
    StaticRoute,
    external_mac,
    nft_body,
    route_changes,
)
from agent.reconcilers.network import desired_router
from minicloud.config import NetworkConfig
from minicloud.network.kinds import NetworkSpec, RouterSpec, RouteSpec, SubnetSpec


def subnet(cidr: str, router: str = "", **kw: object) -> SubnetSpec:
    net = ipaddress.IPv4Network(cidr)
    hosts = list(net.hosts())
    return SubnetSpec(
        network="net-1", cidr=cidr, gateway=str(hosts[0]), allocation_start=str(hosts[1]),
        allocation_end=str(hosts[-1]), router=router, **kw,
    )  # fmt: skip


EXT = {"net-ext": (NetworkSpec(cidr="198.51.100.0/24", external=True, provider="lan"), subnet("198.51.100.0/24"))}
EDGE = RouterSpec(
    subnets=["sub-a", "sub-b"], external_network="net-ext", external_subnet="sub-ext", external_address="198.51.100.100"
)


def test_no_router_no_plan():
    assert desired_router(42, {"sub-a": subnet("10.0.1.0/24")}, {}, EXT, {"lan": "eth1"}) == (None, None)


def test_a_router_without_external_gateway_only_forwards():
    subnets = {"sub-a": subnet("10.0.1.0/24", "rtr-1"), "sub-b": subnet("10.0.2.0/24", "rtr-1")}
    assert desired_router(42, subnets, {"rtr-1": RouterSpec(subnets=["sub-a", "sub-b"])}, EXT, {}) == (
        RouterPlan(42),
        None,
    )


def test_an_external_gateway_snats_the_routers_subnets_of_the_network_through_the_nodes_provider_interface():
    subnets = {
        "sub-a": subnet("10.0.1.0/24", "rtr-1"),
        "sub-b": subnet("10.0.2.0/24", "rtr-1"),
        "sub-c": subnet("10.0.3.0/24"),  # not attached: not SNATed
        "sub-d": subnet("10.0.4.0/24", "rtr-1", deleting=True),
    }
    plan, missing = desired_router(42, subnets, {"rtr-1": EDGE}, EXT, {"lan": "br-lan"})
    assert missing is None
    assert plan == RouterPlan(
        42,
        ExternalLeg(
            router_id="rtr-1",
            interface="br-lan",
            address=ipaddress.IPv4Interface("198.51.100.100/24"),
            gateway=ipaddress.IPv4Address("198.51.100.1"),
            sources=(ipaddress.IPv4Network("10.0.1.0/24"), ipaddress.IPv4Network("10.0.2.0/24")),
        ),
    )
    assert plan.external is not None and plan.external.mac == external_mac("rtr-1")
    body = nft_body(plan.external)
    assert 'oifname "mce0" ip saddr { 10.0.1.0/24, 10.0.2.0/24 } snat to 198.51.100.100' in body
    assert 'iifname != "mcs0" drop' in body
    assert 'iifname "mcr-*" oifname "mcs0" accept' in body  # from another network of its routers, inwards only


def test_a_node_without_the_provider_forwards_and_says_what_is_missing():
    plan, missing = desired_router(42, {"sub-a": subnet("10.0.1.0/24", "rtr-1")}, {"rtr-1": EDGE}, EXT, {})
    assert plan == RouterPlan(42) and missing is not None and "'lan'" in missing


def test_the_external_mac_is_the_same_everywhere_local_and_unicast():
    mac = external_mac("rtr-1")
    assert mac == external_mac("rtr-1") != external_mac("rtr-2")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01


async def test_the_fake_plumbing_keeps_the_last_plan():
    fake = FakeRouterPlumbing()
    await fake.ensure("/run/netns/mcs-00002a", RouterPlan(42))
    assert fake.plans == {"/run/netns/mcs-00002a": RouterPlan(42)}
    await fake.ensure("/run/netns/mcs-00002a", None)
    assert fake.plans == {}


def test_providers_config():
    assert msgspec.convert({"providers": {"lan": "eth1"}}, NetworkConfig).providers == {"lan": "eth1"}
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"providers": {"lan": "an-interface-name-too-long"}}, NetworkConfig)


def test_floating_ips_of_this_nodes_nics_on_the_legs_network_are_natted_here():
    from agent.net.router import FloatingLeg, floating_name
    from minicloud.network.kinds import FloatingIpSpec

    subnets = {"sub-a": subnet("10.0.1.0/24", "rtr-1"), "sub-c": subnet("10.0.3.0/24")}
    here = FloatingIpSpec(network="net-ext", subnet="sub-ext", address="198.51.100.101", fixed_address="10.0.1.5")
    unrouted = FloatingIpSpec(network="net-ext", subnet="sub-ext", address="198.51.100.102", fixed_address="10.0.3.5")
    plan, _ = desired_router(42, subnets, {"rtr-1": EDGE}, EXT, {"lan": "eth1"}, [("fip-1", here), ("fip-2", unrouted)])
    assert plan is not None and plan.external is not None
    fip = FloatingLeg("fip-1", ipaddress.IPv4Address("198.51.100.101"), ipaddress.IPv4Address("10.0.1.5"))
    assert plan.floating == (fip,)
    assert fip.name == floating_name("fip-1") and len(fip.name) <= 15 and fip.mac != plan.external.mac
    body = nft_body(plan.external, plan.floating)
    assert "ip daddr 198.51.100.101 dnat to 10.0.1.5" in body
    # the NIC leaves as its floating IP, before the router's SNAT
    assert body.index("ip saddr 10.0.1.5 snat to 198.51.100.101") < body.index("snat to 198.51.100.100")
    assert "ct status dnat accept" in body
    # hairpin: a NIC inside reaching the floating IP is DNATed back in and leaves as the gateway
    assert 'iifname "mcs0" oifname "mcs0" ct status dnat masquerade' in body
    assert "masquerade" not in nft_body(plan.external)  # nothing to hairpin without a floating IP


def test_the_floating_ip_of_a_nic_arriving_by_migration_is_only_snatted_on_the_target():
    """Live migration of a guest behind a floating IP: the target SNATs its NIC to the floating IP from its first
    packet there (its replies leave as the floating IP through the target's own leg) but takes none of the LAN's
    traffic for it: no DNAT, no leg answering ARP, until the NIC's record moves."""
    from agent.net.router import FloatingLeg
    from minicloud.network.kinds import FloatingIpSpec

    subnets = {"sub-a": subnet("10.0.1.0/24", "rtr-1")}
    coming = FloatingIpSpec(network="net-ext", subnet="sub-ext", address="198.51.100.101", fixed_address="10.0.1.5")
    plan, _ = desired_router(42, subnets, {"rtr-1": EDGE}, EXT, {"lan": "eth1"}, [], arriving=[("fip-1", coming)])
    assert plan is not None and plan.external is not None and plan.floating == ()
    assert plan.arriving == (
        FloatingLeg("fip-1", ipaddress.IPv4Address("198.51.100.101"), ipaddress.IPv4Address("10.0.1.5")),
    )
    body = nft_body(plan.external, plan.floating, plan.more, plan.arriving)
    assert body.index("ip saddr 10.0.1.5 snat to 198.51.100.101") < body.index("snat to 198.51.100.100")
    assert "dnat to" not in body and "masquerade" not in body
    # only guests arriving here, but of a router with a gateway: the node's own leg is built (its own address)
    plan, _ = desired_router(42, subnets, {"rtr-1": EDGE}, EXT, {"lan": "eth1"}, [], external=False)
    assert plan is not None and plan.external is None


def test_routed_frames_leave_for_other_nodes_with_a_mac_of_the_node_not_the_gateways():
    from agent.net.router import routed_body, routed_mac
    from agent.net.service import service_mac

    mac = routed_mac(42, "10.0.0.11")
    assert mac != routed_mac(42, "10.0.0.12") and mac != service_mac(42)
    own = ("169.254.169.254", "10.0.2.1", "10.0.1.1")
    assert routed_body(42, mac, own).splitlines() == [
        "\tchain forward {",
        "\t\ttype filter hook forward priority -20; policy accept;",
        '\t\toifname "mcv-00002a" ether saddr 02:4d:43:00:00:2a ip saddr != { 10.0.1.1, 10.0.2.1, 169.254.169.254 } '
        f"ether saddr set {mac}",
        "\t}",
    ]


def test_static_routes_are_those_whose_next_hop_is_on_the_routers_subnets_of_this_network():
    subnets = {"sub-a": subnet("10.0.1.0/24", "rtr-1"), "sub-c": subnet("10.0.3.0/24", "rtr-2")}
    routers = {
        "rtr-1": RouterSpec(
            subnets=["sub-a", "sub-b"],
            routes=[
                RouteSpec(destination="10.9.0.0/16", nexthop="10.0.1.254"),
                RouteSpec(destination="10.8.0.0/16", nexthop="10.0.2.254"),  # via sub-b, another network's
                RouteSpec(destination="192.0.2.0/24", nexthop="10.0.1.253"),
            ],
        ),
        "rtr-2": RouterSpec(
            subnets=["sub-c"],
            routes=[
                RouteSpec(destination="10.9.0.0/16", nexthop="10.0.3.254"),  # the same destination: rtr-1's wins
                RouteSpec(destination="10.7.0.0/16", nexthop="10.0.1.9"),  # not on rtr-2's own subnet
            ],
        ),
    }
    plan, missing = desired_router(42, subnets, routers, EXT, {})
    assert missing is None and plan is not None
    assert plan.routes == (
        StaticRoute(ipaddress.IPv4Network("10.9.0.0/16"), ipaddress.IPv4Address("10.0.1.254")),
        StaticRoute(ipaddress.IPv4Network("192.0.2.0/24"), ipaddress.IPv4Address("10.0.1.253")),
    )
    # with an external gateway too (and when its provider is missing here)
    edge = msgspec.structs.replace(EDGE, routes=routers["rtr-1"].routes)
    for providers in ({"lan": "eth1"}, {}):
        plan, _ = desired_router(42, {"sub-a": subnet("10.0.1.0/24", "rtr-1")}, {"rtr-1": edge}, EXT, providers)
        assert plan is not None and [str(r.destination) for r in plan.routes] == ["10.9.0.0/16", "192.0.2.0/24"]


def test_route_changes_delete_what_is_no_longer_wanted_and_replace_a_changed_next_hop():
    def r(dst: str, via: str) -> StaticRoute:
        return StaticRoute(ipaddress.IPv4Network(dst), ipaddress.IPv4Address(via))

    have = [r("10.9.0.0/16", "10.0.1.254"), r("10.8.0.0/16", "10.0.1.254")]
    want = [r("10.9.0.0/16", "10.0.1.253"), r("10.7.0.0/16", "10.0.1.254")]
    assert route_changes(have, want) == (
        [r("10.8.0.0/16", "10.0.1.254")],
        [r("10.7.0.0/16", "10.0.1.254"), r("10.9.0.0/16", "10.0.1.253")],
    )
    assert route_changes(want, want) == ([], [])


def test_each_router_with_an_external_gateway_gets_its_own_leg_and_snats_its_own_subnets():
    from agent.net.router import FloatingLeg
    from minicloud.network.kinds import FloatingIpSpec

    subnets = {"sub-a": subnet("10.0.1.0/24", "rtr-1"), "sub-b": subnet("10.0.2.0/24", "rtr-2")}
    other = RouterSpec(
        subnets=["sub-b"], external_network="net-ext", external_subnet="sub-ext", external_address="198.51.100.120"
    )
    fip = FloatingIpSpec(network="net-ext", subnet="sub-ext", address="198.51.100.150", fixed_address="10.0.2.5")
    routers = {"rtr-1": EDGE, "rtr-2": other}
    plan, missing = desired_router(42, subnets, routers, EXT, {"lan": "eth1"}, [("fip-9", fip)])
    assert plan is not None and missing is None
    assert [(g.router_id, g.name, g.table, [str(s) for s in g.sources]) for g in plan.legs] == [
        ("rtr-1", "mce0", 0, ["10.0.1.0/24"]),
        ("rtr-2", "mce1", 101, ["10.0.2.0/24"]),
    ]
    assert plan.floating == (
        FloatingLeg("fip-9", ipaddress.IPv4Address("198.51.100.150"), ipaddress.IPv4Address("10.0.2.5"), 1),
    )
    body = nft_body(plan.external, plan.floating, plan.more)
    assert 'oifname { "mce0", "mce1" } ip saddr { 10.0.1.0/24 } snat to 198.51.100.100' in body
    assert 'oifname { "mce0", "mce1" } ip saddr { 10.0.2.0/24 } snat to 198.51.100.120' in body
    assert 'oifname { "mce0", "mce1" } ip saddr 10.0.2.5 snat to 198.51.100.150' in body
    # a leg that cannot be built here does not take the others with it
    plan, missing = desired_router(42, subnets, routers, EXT, {}, [])
    assert plan is not None and plan.legs == () and missing and "rtr-1" in missing


def test_each_external_leg_has_a_named_egress_counter_read_back_from_nft_json():
    from agent.net.router import parse_egress_counters
    from agent.reconcilers.egress import egress_status

    plan, _ = desired_router(42, {"sub-a": subnet("10.0.1.0/24", "rtr-1")}, {"rtr-1": EDGE}, EXT, {"lan": "br-lan"})
    assert plan.external is not None
    body = nft_body(plan.external)
    assert "\tcounter egress_mce0 {" in body
    assert "type filter hook postrouting priority 300; policy accept;" in body  # every packet, not only the first
    assert 'oifname "mce0" counter name "egress_mce0"' in body
    answer = json.dumps({"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"counter": {"family": "ip", "name": "egress_mce0", "table": "minicloud_rtr", "handle": 1,
                     "packets": 3, "bytes": 4200}},
        {"counter": {"family": "ip", "name": "egress_mce1", "table": "minicloud_rtr", "packets": 1, "bytes": 7}},
        {"counter": {"family": "ip", "name": "other", "table": "minicloud_rtr", "packets": 1, "bytes": 9}},
        {"counter": {"family": "ip", "name": "egress_mce0", "table": "elsewhere", "packets": 1, "bytes": 9}},
    ]})  # fmt: skip
    assert parse_egress_counters(answer) == {"mce0": 4200, "mce1": 7}
    assert parse_egress_counters("") == {}
    status = egress_status({}, "n1", 100, 4200)
    assert status == {"egress": {"n1": {"since": 100, "bytes": 4200}}}
    assert egress_status(status, "n1", 100, 4200) is None  # nothing new: no write
    assert egress_status(status, "n2", 50, 1)["egress"] == {"n1": {"since": 100, "bytes": 4200},
                                                             "n2": {"since": 50, "bytes": 1}}  # fmt: skip


async def test_report_egress_writes_each_legs_counter_into_its_routers_status_once(tmp_path):
    from agent.reconcilers.egress import report_egress
    from minicloud.state import Create, Record, SQLiteStore, Txn

    plan, _ = desired_router(42, {"sub-a": subnet("10.0.1.0/24", "rtr-1")}, {"rtr-1": EDGE}, EXT, {"lan": "br-lan"})

    class Plumbing:
        def applied(self):
            return {"/run/netns/mcs-42": plan}

        def egress_since(self, path):
            return 1700

    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        await store.commit(Txn([Create(Record(kind="router", id="rtr-1", project="default", name="edge",
                                              created_at="2026-11-30T00:00:00.000Z",
                                              updated_at="2026-11-30T00:00:00.000Z"))]))  # fmt: skip

        async def read(path):
            assert path == "/run/netns/mcs-42"
            return {"mce0": 4200}

        assert await report_egress(store, Plumbing(), "n1", read) == 1
        assert (await store.get("router", "rtr-1")).status == {"egress": {"n1/42": {"since": 1700, "bytes": 4200}}}
        assert await report_egress(store, Plumbing(), "n1", read) == 0  # unchanged: no write
        from minicloud.network.kinds import ROUTER

        shown = ROUTER.view_record(await store.get("router", "rtr-1"))  # what `router show` answers
        assert {leg: (e.since, e.bytes) for leg, e in shown.egress.items()} == {"n1/42": (1700, 4200)}
    finally:
        await store.close()


async def test_the_egress_reporter_reports_at_most_once_an_interval():
    from agent.reconcilers.egress import EgressReporter

    calls = []

    class Plumbing:
        def applied(self):
            calls.append(1)
            return {}

    now = [1000.0]
    reporter = EgressReporter(None, Plumbing, "n1", interval=60, clock=lambda: now[0])
    await reporter.refresh()
    now[0] += 30
    await reporter.refresh()
    assert len(calls) == 1
    now[0] += 31
    await reporter.refresh()
    assert len(calls) == 2
    await EgressReporter(None, lambda: None, "n1").refresh()  # no network reconciler yet: nothing


def test_a_node_with_no_nic_of_the_network_here_or_arriving_gets_no_external_leg():
    subnets = {"sub-a": subnet("10.0.1.0/24", "rtr-1")}
    plan, missing = desired_router(42, subnets, {"rtr-1": EDGE}, EXT, {"lan": "eth1"}, external=False)
    assert plan is not None and plan.legs == () and plan.floating == () and missing is None
    with_legs, _ = desired_router(42, subnets, {"rtr-1": EDGE}, EXT, {"lan": "eth1"})
    assert with_legs is not None and [leg.name for leg in with_legs.legs] == ["mce0"]


def test_each_node_has_its_own_address_and_mac_on_the_lan_for_one_router():
    subnets = {"sub-a": subnet("10.0.1.0/24", "rtr-1")}
    first, _ = desired_router(
        42, subnets, {"rtr-1": EDGE}, EXT, {"lan": "eth1"}, addresses={"rtr-1": EDGE.external_address}
    )
    other, _ = desired_router(42, subnets, {"rtr-1": EDGE}, EXT, {"lan": "eth1"}, addresses={"rtr-1": "198.51.100.77"})
    assert first is not None and other is not None and first.external is not None and other.external is not None
    assert str(first.external.address.ip) == EDGE.external_address and first.external.mac == external_mac("rtr-1")
    assert str(other.external.address.ip) == "198.51.100.77" and other.external.mac not in (first.external.mac,)
    assert other.external.mac == external_mac("rtr-1/198.51.100.77")  # fixed for that address: adopted after a restart
    none, missing = desired_router(42, subnets, {"rtr-1": EDGE}, EXT, {"lan": "eth1"}, addresses={})
    assert none is not None and none.legs == () and missing == "router rtr-1 has no external address for this node yet"
