"""The default network's pure parts: the spec, dnsmasq's command line, the nftables script, lease parsing, the fake."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.net.default import (
    DEFAULT_LEASE_SECONDS,
    DRIVERS,
    BridgeNetwork,
    FakeNetwork,
    NetworkDriver,
    NetworkSpec,
    dnsmasq_argv,
    guest_tap,
    hosts_text,
    nft_delete_script,
    nft_script,
    parse_hosts,
    parse_leases,
    pick_address,
)

IP = ipaddress.IPv4Address


def spec(**kw: object) -> NetworkSpec:
    args: dict[str, object] = {"name": "default", "bridge": "mcbr0", "cidr": ipaddress.IPv4Network("10.213.0.0/24")}
    args.update(kw)
    return NetworkSpec(**args)  # type: ignore[arg-type]


# --- NetworkSpec -------------------------------------------------------------------------------------------------------


def test_spec_derives_gateway_dhcp_range_and_table_from_cidr_and_bridge():
    s = spec()
    assert s.gateway == IP("10.213.0.1")
    assert (s.dhcp_start, s.dhcp_end) == (IP("10.213.0.10"), IP("10.213.0.254"))
    assert s.table == "minicloud-mcbr0"
    assert s.lease_seconds == DEFAULT_LEASE_SECONDS == 43200


def test_spec_accepts_a_string_cidr_and_explicit_range():
    s = spec(cidr="192.168.50.0/24", dhcp_start="192.168.50.100", dhcp_end="192.168.50.199")
    assert s.cidr == ipaddress.IPv4Network("192.168.50.0/24")
    assert (s.dhcp_start, s.dhcp_end) == (IP("192.168.50.100"), IP("192.168.50.199"))


def test_small_network_starts_its_range_after_the_gateway():
    s = spec(cidr="10.0.0.0/29")
    assert (s.gateway, s.dhcp_start, s.dhcp_end) == (IP("10.0.0.1"), IP("10.0.0.2"), IP("10.0.0.6"))


@pytest.mark.parametrize(
    "kw",
    [
        {"name": "Default"},
        {"name": ""},
        {"bridge": "a-bridge-name-too-long"},
        {"bridge": "br 0"},
        {"bridge": "0br"},
        {"cidr": "10.213.0.1/24"},  # host bits set
        {"cidr": "10.213.0.0/31"},
        {"cidr": "fd00::/64"},
        {"dhcp_start": "10.213.0.1"},  # the gateway
        {"dhcp_end": "10.213.0.255"},  # broadcast
        {"dhcp_start": "10.213.0.50", "dhcp_end": "10.213.0.40"},
        {"dhcp_start": "10.214.0.10"},
        {"lease_seconds": 60},
        {"upstream_dns": ("not-an-ip",)},
    ],
)
def test_invalid_spec_is_rejected(kw):
    with pytest.raises(ValueError):
        spec(**kw)


def test_bridge_mac_is_stable_unicast_and_locally_administered():
    mac = spec().bridge_mac
    assert mac == spec().bridge_mac != spec(bridge="mcbr1").bridge_mac
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert len(mac.split(":")) == 6


# --- dnsmasq command line ----------------------------------------------------------------------------------------------


def test_dnsmasq_argv_binds_to_the_bridge_and_keeps_its_files_in_the_state_dir():
    argv = dnsmasq_argv(spec(), Path("/var/lib/minicloud/net/default"), "/usr/sbin/dnsmasq")
    assert argv[0] == "/usr/sbin/dnsmasq"
    for flag in [
        "--conf-file=/dev/null",
        "--pid-file=/var/lib/minicloud/net/default/dnsmasq.pid",
        "--log-facility=/var/lib/minicloud/net/default/dnsmasq.log",
        "--dhcp-leasefile=/var/lib/minicloud/net/default/leases",
        "--bind-interfaces",
        "--interface=mcbr0",
        "--except-interface=lo",
        "--listen-address=10.213.0.1",
        "--dhcp-range=10.213.0.10,10.213.0.254,255.255.255.0,43200",
        "--dhcp-authoritative",
        "--no-ping",
        "--dhcp-option=option:router,10.213.0.1",
        "--no-hosts",
        "--dhcp-hostsfile=/var/lib/minicloud/net/default/hosts",
        "--user=root",
    ]:
        assert flag in argv
    assert "--keep-in-foreground" not in argv and "--no-daemon" not in argv  # it must outlive the agent


def test_dnsmasq_argv_is_deterministic_and_makes_the_state_dir_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dnsmasq_argv(spec(), Path("net")) == dnsmasq_argv(spec(), tmp_path / "net")
    assert f"--pid-file={tmp_path / 'net' / 'dnsmasq.pid'}" in dnsmasq_argv(spec(), Path("net"))


def test_dnsmasq_dns_defaults_to_the_hosts_resolvers_and_keeps_local_names_local():
    argv = dnsmasq_argv(spec(), Path("/s"))
    assert {"--port=53", "--domain-needed", "--bogus-priv", "--resolv-file=/etc/resolv.conf"} <= set(argv)
    assert "--no-resolv" not in argv


def test_dnsmasq_dns_with_explicit_upstreams_ignores_resolv_conf():
    argv = dnsmasq_argv(spec(upstream_dns=("192.0.2.53", "2001:db8::53")), Path("/s"))
    assert argv[-2:] == ["--server=192.0.2.53", "--server=2001:db8::53"]
    assert "--no-resolv" in argv and "--strict-order" in argv
    assert not any(a.startswith("--resolv-file") for a in argv)


def test_dnsmasq_without_dns_listens_on_no_dns_port():
    argv = dnsmasq_argv(spec(dns=False), Path("/s"))
    assert "--port=0" in argv and "--port=53" not in argv
    assert not any(a.startswith(("--server", "--resolv-file")) for a in argv)


# --- nftables ----------------------------------------------------------------------------------------------------------

NAT_GOLDEN = """\
table ip minicloud-mcbr0 {}
delete table ip minicloud-mcbr0
table bridge minicloud-mcbr0 {}
delete table bridge minicloud-mcbr0
table ip minicloud-mcbr0 {
\tcomment "minicloud network default (NAT); managed by the agent, edits are overwritten"
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 10.213.0.0/24 ip daddr != 10.213.0.0/24 oifname != "mcbr0" masquerade
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "mcbr0" oifname "mcbr0" accept
\t\tiifname "mcbr0" ip saddr 10.213.0.0/24 accept
\t\tiifname "mcbr0" drop
\t\toifname "mcbr0" ct state established,related accept
\t\toifname "mcbr0" drop
\t}
}
"""


def test_nft_script_for_a_nat_network_matches_the_golden_text():
    assert nft_script(spec()) == NAT_GOLDEN


def test_nft_script_for_an_isolated_network_has_no_nat_and_drops_traffic_leaving_the_bridge():
    script = nft_script(spec(masquerade=False))
    assert "masquerade" not in script and "postrouting" not in script
    assert '\t\tiifname "mcbr0" oifname "mcbr0" accept\n\t\tiifname "mcbr0" drop\n\t\toifname "mcbr0" drop\n' in script
    assert "(isolated)" in script


def test_nft_scripts_replace_the_table_whether_or_not_it_exists():
    both = (
        "table ip minicloud-mcbr0 {}\ndelete table ip minicloud-mcbr0\n"
        "table bridge minicloud-mcbr0 {}\ndelete table bridge minicloud-mcbr0\n"
    )
    assert nft_script(spec()).startswith(both)
    assert nft_delete_script("minicloud-mcbr0") == both


def test_no_guest_may_claim_an_address_above_the_dhcp_range_but_a_pinned_one_keeps_its_own():
    assert spec().reserved is None and "table bridge minicloud-mcbr0 {\n" not in nft_script(spec())
    shrunk = spec(
        dhcp_end="10.213.0.191",
        static_hosts=(("52:54:00:aa:00:01", "10.213.0.200"), ("52:54:00:aa:00:02", "10.213.0.50")),
    )
    assert shrunk.reserved == (ipaddress.IPv4Address("10.213.0.192"), ipaddress.IPv4Address("10.213.0.254"))
    assert nft_script(shrunk).split("table bridge minicloud-mcbr0 {\n", 1)[1] == (
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority -300; policy accept;\n"
        '\t\tiifname != "vnet*" iifname != "mcg-*" accept\n'
        "\t\tether saddr 52:54:00:aa:00:01 ip saddr 10.213.0.200 accept\n"
        "\t\tether saddr 52:54:00:aa:00:01 arp saddr ip 10.213.0.200 accept\n"
        "\t\tip saddr 10.213.0.192-10.213.0.254 drop\n"
        "\t\tarp saddr ip 10.213.0.192-10.213.0.254 drop\n"
        "\t}\n"
        "}\n"
    )


# --- leases ------------------------------------------------------------------------------------------------------------

LEASES = """\
1795436598 E6:41:BC:26:8C:1A 10.213.0.37 guest1 01:e6:41:bc:26:8c:1a
0 52:54:00:00:00:02 10.213.0.38 * *
1000 52:54:00:00:00:03 10.213.0.39 expired *
1795436598 20-00:11:22:33:44:55:66:77:88:99 10.213.0.40 ib *
garbage line
1795436598 52:54:00:00:00:05 not-an-ip x *
duid 00:01:00:01:2c:2d:2e:2f:52:54:00:00:00:01
1795436598 1234 fd00::5 guest6 00:01:00:01
"""


def test_parse_leases_maps_lowercase_mac_to_ipv4_and_skips_expired_and_foreign_lines():
    assert parse_leases(LEASES, now=2000) == {"e6:41:bc:26:8c:1a": "10.213.0.37", "52:54:00:00:00:02": "10.213.0.38"}


def test_parse_leases_of_nothing_is_empty():
    assert parse_leases("") == {}
    assert parse_leases("\n\n") == {}


def test_leases_reads_the_lease_file_in_the_state_dir(tmp_path):
    net = BridgeNetwork(spec(), tmp_path)
    assert net.leases() == {}  # no file yet
    (tmp_path / "leases").write_text("0 52:54:00:AA:BB:CC 10.213.0.10 vm1 *\n")
    assert net.leases() == {"52:54:00:aa:bb:cc": "10.213.0.10"}
    assert net.gateway == "10.213.0.1"
    assert net.dnsmasq_pid() is None


# --- the fake and the registry -----------------------------------------------------------------------------------------


async def test_fake_network_converges_hands_out_leases_and_tears_down():
    net = FakeNetwork(spec())
    with pytest.raises(RuntimeError):
        net.add_lease("52:54:00:00:00:01")
    await net.ensure()
    await net.ensure()
    assert net.present and net.ensure_calls == 2
    assert net.add_lease("52:54:00:00:00:01") == "10.213.0.10"
    assert net.add_lease("52:54:00:00:00:02") == "10.213.0.11"
    assert net.add_lease("52:54:00:00:00:03", "10.213.0.99") == "10.213.0.99"
    with pytest.raises(ValueError):
        net.add_lease("52:54:00:00:00:04", "10.213.0.99")  # taken
    with pytest.raises(ValueError):
        net.add_lease("52:54:00:00:00:04", "10.213.0.2")  # outside the range
    net.drop_lease("52:54:00:00:00:02")
    assert net.leases() == {"52:54:00:00:00:01": "10.213.0.10", "52:54:00:00:00:03": "10.213.0.99"}
    await net.teardown()
    await net.teardown()
    assert not net.present and net.leases() == {} and net.teardown_calls == 2


async def test_fake_network_failure_changes_nothing():
    net = FakeNetwork(spec(), fail_with=RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        await net.ensure()
    assert not net.present and net.ensure_calls == 0


def test_drivers_are_built_from_the_registry_with_spec_and_state_dir(tmp_path):
    for name, factory in DRIVERS.items():
        driver: NetworkDriver = factory(spec(), tmp_path)
        assert driver.spec == spec(), name
        assert driver.gateway == "10.213.0.1"
        assert driver.leases() == {}


# --- the guests' fixed addresses ---------------------------------------------------------------------------------------
A, B, C = "52:00:00:00:00:0a", "52:00:00:00:00:0b", "52:00:00:00:00:0c"


def test_pick_address_keeps_a_pin_then_the_current_lease_then_a_preferred_one_else_the_lowest_free():
    s = spec(dhcp_end=IP("10.213.0.191"), static_hosts=((C, "10.213.0.200"),))
    assert pick_address(s, C, {}, {}) == "10.213.0.200"  # pinned above the range: its pin
    assert pick_address(s, A, {}, {A: "10.213.0.50"}, ["10.213.0.60"]) == "10.213.0.50"  # a running guest's lease
    assert pick_address(s, A, {}, {}, ["10.213.0.60"]) == "10.213.0.60"  # e.g. where it ran before
    assert pick_address(s, A, {B: "10.213.0.10"}, {C: "10.213.0.11"}) == "10.213.0.12"
    # never another guest's (assigned or leased), never outside the range
    assert pick_address(s, A, {B: "10.213.0.60"}, {}, ["10.213.0.60", "10.213.0.250", "bad"]) == "10.213.0.10"
    assert pick_address(s, A, {}, {B: "10.213.0.50"}, ["10.213.0.50"]) == "10.213.0.10"
    full = spec(cidr=ipaddress.IPv4Network("10.213.0.0/30"))  # one address in the range
    assert pick_address(full, A, {B: "10.213.0.2"}, {}) is None


def test_pick_address_avoids_what_guests_on_other_nodes_have_while_it_can():
    """Each node's default bridge hands out its own addresses; a guest whose address no guest on another node has
    can move there live, so a new guest's address avoids theirs (``avoid``) until the range has nothing else."""
    s = spec(cidr=ipaddress.IPv4Network("10.213.0.0/29"))  # the range: .2-.6
    others = {"10.213.0.2", "10.213.0.3"}
    assert pick_address(s, A, {}, {}, avoid=others) == "10.213.0.4"
    assert pick_address(s, A, {B: "10.213.0.4"}, {}, avoid=others) == "10.213.0.5"
    # its own lease and the address it had where it ran before still win: a running guest keeps its address
    assert pick_address(s, A, {}, {A: "10.213.0.2"}, avoid=others) == "10.213.0.2"
    assert pick_address(s, A, {}, {}, ["10.213.0.3"], avoid=others) == "10.213.0.3"
    # nothing else free: an address a guest elsewhere has, rather than none
    taken = {B: "10.213.0.4", C: "10.213.0.5", "52:00:00:00:00:0e": "10.213.0.6"}
    assert pick_address(s, A, taken, {}, avoid=others) == "10.213.0.2"


def test_hosts_file_round_trips_and_skips_what_is_not_a_mac_and_an_address():
    text = hosts_text({B: "10.213.0.11", A: "10.213.0.10"})
    assert text == f"{A},10.213.0.10\n{B},10.213.0.11\n"
    assert parse_hosts(text + "junk\n52:00:00:00:00:0d,not-an-ip\n") == {A: "10.213.0.10", B: "10.213.0.11"}


def test_guest_tap_is_a_stable_interface_name_of_its_own():
    assert guest_tap("i-abc") == guest_tap("i-abc") != guest_tap("i-abd")
    assert guest_tap("i-abc").startswith("mcg-") and len(guest_tap("i-abc")) <= 15


async def test_fixed_addresses_are_kept_in_dnsmasqs_hosts_file_and_survive_a_new_driver(tmp_path):
    pinned = spec(static_hosts=((C, "10.213.0.200"),))
    net = BridgeNetwork(pinned, tmp_path)
    assert await net.assign(A) == "10.213.0.10"
    assert await net.assign(A, ["10.213.0.99"]) == "10.213.0.10"  # idempotent
    assert await net.assign(B) == "10.213.0.11"
    assert await net.assign(C) == "10.213.0.200"  # a pin, on dnsmasq's command line already
    assert (tmp_path / "hosts").read_text() == f"{A},10.213.0.10\n{B},10.213.0.11\n"
    again = BridgeNetwork(pinned, tmp_path)  # a restarted agent
    assert again.assignments() == {A: "10.213.0.10", B: "10.213.0.11", C: "10.213.0.200"}
    assert await again.release(A) is True and await again.release(A) is False
    assert (tmp_path / "hosts").read_text() == f"{B},10.213.0.11\n"


async def test_fake_network_leases_a_guest_its_fixed_address():
    net = FakeNetwork(spec())
    await net.ensure()
    assert await net.assign(A) == "10.213.0.10"
    assert net.add_lease(B) == "10.213.0.11"  # not A's
    assert net.add_lease(A) == "10.213.0.10"
    assert await net.release(A) and net.assignments() == {}
