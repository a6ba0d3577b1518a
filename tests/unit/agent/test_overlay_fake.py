"""FakeOverlay keeps LinuxOverlay's contract (idempotent convergence, adoption, errors); dnsmasq and nft renderers."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.net.common import NetworkError
from agent.net.dhcp import DhcpHost, DhcpSpec, DhcpSubnet, DnsRecord, dhcp_argv, dns_file, hosts_file
from agent.net.firewall import NftTable, delete_tables_script, replace_table_script
from agent.net.overlay import DRIVERS, FakeOverlay, FdbEntry, LinuxOverlay, Neighbour, OverlayDriver, OverlaySpec

IP = ipaddress.IPv4Address
SPEC = OverlaySpec(vni=10, local="10.254.0.1", mtu=1450)


def test_both_drivers_satisfy_the_protocol() -> None:
    drivers: list[OverlayDriver] = [FakeOverlay(), LinuxOverlay(netns="unused")]
    assert len(drivers) == 2
    assert set(DRIVERS) == {"linux", "fake"}


async def test_ensure_is_idempotent_and_keeps_ifindexes() -> None:
    fake = FakeOverlay()
    first = await fake.ensure_network(SPEC)
    changes = fake.changes
    assert await fake.ensure_network(SPEC) == first
    assert fake.changes == changes
    mtu = await fake.ensure_network(OverlaySpec(vni=10, local="10.254.0.1", mtu=1400))
    assert (mtu.bridge_index, mtu.vxlan_index) == (first.bridge_index, first.vxlan_index)
    assert [n.vni for n in await fake.list_networks()] == [10]


async def test_a_new_local_address_replaces_the_vxlan_device_and_its_fdb() -> None:
    fake = FakeOverlay()
    first = await fake.ensure_network(SPEC)
    await fake.set_fdb(10, [FdbEntry("52:54:00:00:00:01", "10.254.0.2")])
    moved = await fake.ensure_network(OverlaySpec(vni=10, local="10.254.0.9"))
    assert moved.bridge_index == first.bridge_index and moved.vxlan_index != first.vxlan_index
    assert fake.networks[10].fdb == {}


async def test_set_calls_converge_to_exactly_the_given_set() -> None:
    fake = FakeOverlay()
    await fake.ensure_network(SPEC)
    await fake.set_peers(10, ["10.254.0.2", "10.254.0.3"])
    delta = await fake.set_peers(10, ["10.254.0.3", "10.254.0.4"])
    assert set(delta.upsert) == {IP("10.254.0.4")} and delta.remove == {IP("10.254.0.2")}
    assert set(fake.networks[10].peers) == {IP("10.254.0.3"), IP("10.254.0.4")}
    await fake.set_neighbours(10, [Neighbour("10.0.0.2", "52:54:00:00:00:02")])
    assert (await fake.set_neighbours(10, [Neighbour("10.0.0.2", "52:54:00:00:00:02")])).empty
    await fake.set_neighbours(10, [])
    assert fake.networks[10].neighbours == {}


async def test_set_on_an_absent_network_raises_and_remove_is_idempotent() -> None:
    fake = FakeOverlay()
    with pytest.raises(NetworkError, match="ensure it first"):
        await fake.set_fdb(10, [])
    await fake.ensure_network(SPEC)
    await fake.remove_network(10)
    await fake.remove_network(10)
    assert await fake.list_networks() == []
    fake.fail_with = NetworkError("boom")
    with pytest.raises(NetworkError, match="boom"):
        await fake.ensure_network(SPEC)


# --- dnsmasq renderers -------------------------------------------------------------------------------------------------

DHCP = DhcpSpec(
    network="blue",
    interface="mcb-00000a",
    server=ipaddress.IPv4Interface("10.5.0.2/24"),
    router=IP("10.5.0.1"),
    mtu=1450,
    upstream_dns=("192.0.2.53",),
)


def test_dnsmasq_serves_static_hosts_only_with_mtu_and_a_local_domain(tmp_path: Path) -> None:
    argv = dhcp_argv(DHCP, tmp_path)
    assert argv == dhcp_argv(DHCP, tmp_path)  # deterministic: how a running dnsmasq is recognised
    assert "--dhcp-range=10.5.0.0,static,255.255.255.0,3600" in argv
    assert "--dhcp-option=option:mtu,1450" in argv and "--dhcp-option=option:router,10.5.0.1" in argv
    assert "--domain=blue.internal,10.5.0.0/24,local" in argv
    assert "--interface=mcb-00000a" in argv and "--listen-address=10.5.0.2" in argv
    assert argv[-3:] == ["--no-resolv", "--strict-order", "--server=192.0.2.53"]
    assert f"--dhcp-hostsfile={tmp_path / 'hosts'}" in argv and f"--addn-hosts={tmp_path / 'dns'}" in argv


def test_dhcp_only_serves_no_dns_and_hands_out_the_lans_name_servers(tmp_path: Path) -> None:
    """An external network's DHCP port faces the LAN: no resolver of ours there, the LAN's name servers handed out."""
    spec = DhcpSpec(
        network="public",
        interface="mcs0",
        server=ipaddress.IPv4Interface("192.0.2.100/24"),
        router=IP("192.0.2.1"),
        mtu=1500,
        upstream_dns=("192.0.2.53", "192.0.2.54"),
        dns=False,
    )
    argv = dhcp_argv(spec, tmp_path)
    assert argv[-1] == "--port=0" and "--port=53" not in argv and "--no-resolv" in argv
    assert "--dhcp-option=option:dns-server,192.0.2.53,192.0.2.54" in argv
    assert (
        "--dhcp-option=option:router,192.0.2.1" in argv and "--dhcp-range=192.0.2.0,static,255.255.255.0,3600" in argv
    )
    assert not any(
        a.startswith(("--addn-hosts", "--domain", "--server", "--dhcp-option=option:domain-name")) for a in argv
    )
    bare = dhcp_argv(DhcpSpec(network="public", interface="mcs0", server=ipaddress.IPv4Interface("192.0.2.100/24"),
                              mtu=1500, upstream_dns=(), dns=False), tmp_path)  # fmt: skip
    assert "--dhcp-option=option:dns-server" in bare


def test_one_dnsmasq_serves_several_subnets_each_with_its_own_router_and_dns_server(tmp_path: Path) -> None:
    spec = DhcpSpec(
        network="blue",
        interface="mcs0",
        server=ipaddress.IPv4Interface("10.5.0.1/24"),
        router=IP("10.5.0.1"),
        mtu=1450,
        more=(DhcpSubnet(ipaddress.IPv4Interface("10.6.0.254/24"), IP("10.6.0.254")),),
    )
    argv = dhcp_argv(spec, tmp_path)
    for want in (
        "--listen-address=10.5.0.1",
        "--listen-address=10.6.0.254",
        "--dhcp-range=set:s0,10.5.0.0,static,255.255.255.0,3600",
        "--dhcp-range=set:s1,10.6.0.0,static,255.255.255.0,3600",
        "--dhcp-option=tag:s0,option:router,10.5.0.1",
        "--dhcp-option=tag:s1,option:router,10.6.0.254",
        "--dhcp-option=tag:s1,option:dns-server,10.6.0.254",
        "--dhcp-option=option:domain-name,blue.internal",
        "--domain=blue.internal,10.6.0.0/24,local",
    ):
        assert want in argv
    assert "--dhcp-option=option:router" not in " ".join(argv)  # every router option is per subnet
    text = hosts_file(
        spec, [DhcpHost("52:54:00:00:00:0a", "10.5.0.10", "a"), DhcpHost("52:54:00:00:00:0b", "10.6.0.10", "b")]
    )
    assert text.splitlines() == ["52:54:00:00:00:0a,10.5.0.10,a", "52:54:00:00:00:0b,10.6.0.10,b"]
    for bad in ("10.6.0.254", "10.7.0.1"):  # another subnet's server address; no subnet's address
        with pytest.raises(ValueError, match="usable host address"):
            hosts_file(spec, [DhcpHost("52:54:00:00:00:0a", bad, "x")])
    with pytest.raises(ValueError, match="overlap"):
        DhcpSpec(network="x", interface="br", server=ipaddress.IPv4Interface("10.5.0.1/24"), mtu=1450,
                 more=(DhcpSubnet(ipaddress.IPv4Interface("10.5.0.129/25")),))  # fmt: skip
    with pytest.raises(ValueError, match="outside the subnet"):
        DhcpSubnet(ipaddress.IPv4Interface("10.6.0.1/24"), IP("10.5.0.1"))


def test_hosts_and_dns_files() -> None:
    hosts = [DhcpHost("52:54:00:00:00:0B", "10.5.0.11", "web2"), DhcpHost("52:54:00:00:00:0a", "10.5.0.10", "web1")]
    assert hosts_file(DHCP, hosts) == "52:54:00:00:00:0a,10.5.0.10,web1\n52:54:00:00:00:0b,10.5.0.11,web2\n"
    assert dns_file(DHCP, [DnsRecord("db", "10.5.0.77")]) == "10.5.0.77 db.blue.internal db\n"
    for bad in ("10.6.0.1", "10.5.0.2", "10.5.0.255"):
        with pytest.raises(ValueError, match="usable host address"):
            hosts_file(DHCP, [DhcpHost("52:54:00:00:00:0a", bad, "x")])
    with pytest.raises(ValueError, match="twice"):
        hosts_file(
            DHCP, [DhcpHost("52:54:00:00:00:0a", "10.5.0.10", "a"), DhcpHost("52:54:00:00:00:0b", "10.5.0.10", "b")]
        )
    with pytest.raises(ValueError, match="DNS label"):
        DnsRecord("Not_A_Label", "10.5.0.9")
    with pytest.raises(ValueError, match="outside the subnet"):
        DhcpSpec(
            network="x", interface="br", server=ipaddress.IPv4Interface("10.5.0.2/24"), router=IP("10.6.0.1"), mtu=1450
        )


def test_nft_scripts_replace_and_delete_in_one_transaction() -> None:
    t = NftTable("inet", "minicloud-sg")
    assert replace_table_script(t, "\tchain c {\n\t}\n") == (
        "table inet minicloud-sg {}\ndelete table inet minicloud-sg\ntable inet minicloud-sg {\n\tchain c {\n\t}\n}\n"
    )
    assert delete_tables_script([t, t]) == "table inet minicloud-sg {}\ndelete table inet minicloud-sg\n"
    assert delete_tables_script([]) == ""
    with pytest.raises(ValueError):
        NftTable("inet", "bad name; flush ruleset")
