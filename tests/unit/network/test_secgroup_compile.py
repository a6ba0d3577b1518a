"""The security-group compiler: golden nft output (the exact text the node applies with ``nft -f``): stateless
anti-spoofing in ``bridge minicloud_sg``, the stateful group rules in ``inet minicloud_sg``; the whole ruleset
(start-up, drift repair) and the incremental transactions (``delta_script``) of each kind of change.
``tests/integration/test_security_groups.py`` checks in a namespace that the deltas leave the kernel exactly where
the whole ruleset would."""

from __future__ import annotations

import dataclasses

import pytest

from minicloud.network.secgroup_compile import Group, Port, Rule, build, compile_rules, delta_script

BR = "mcb-00002a"


def _on(bridge: str, *ips: str) -> tuple[tuple[str, str], ...]:
    """Group members: ``ips`` on ``bridge``."""
    return tuple((bridge, ip) for ip in ips)


DEFAULT = Group(
    "sg-default",
    (Rule("egress", remote_cidr="0.0.0.0/0"), Rule("ingress", remote_group="sg-default")),
    _on(BR, "10.0.0.12", "10.0.0.5", "10.0.0.9"),
)
WEB = Group(
    "sg-web",
    (
        Rule("ingress", "tcp", 80),
        Rule("ingress", "tcp", 8000, 8080, remote_cidr="192.168.0.0/16"),
        Rule("ingress", "icmp"),
        Rule("ingress", "udp", remote_group="sg-default"),
        Rule("egress"),
    ),
    _on(BR, "10.0.0.5"),
)
NIC1 = Port("nic-1", "tap1", "52:54:00:12:34:56", ("10.0.0.5",), ("sg-default", "sg-web"), "mcb-00002a", 42)


def test_golden_two_groups_one_port():
    assert (
        compile_rules([WEB, DEFAULT], [NIC1])
        == """\
table bridge minicloud_sg {}
delete table bridge minicloud_sg
table inet minicloud_sg {}
delete table inet minicloud_sg
table bridge minicloud_sg {
\tmap spoof {
\t\ttype ifname : verdict
\t\telements = { "tap1" : jump o_nic_1 }
\t}
\tset taps {
\t\ttype ifname
\t\telements = { "tap1" }
\t}
\tchain prerouting {
\t\ttype filter hook prerouting priority -300; policy accept;
\t\tiifname vmap @spoof
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\toifname @taps ether type != { ip, arp } drop
\t}
\tchain o_nic_1 {
\t\tether saddr != 52:54:00:12:34:56 drop
\t\tether type arp arp saddr ether != 52:54:00:12:34:56 drop
\t\tether type arp arp saddr ip != { 10.0.0.5 } drop
\t\tether type arp accept
\t\tether type != ip drop
\t\tip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept
\t\tip saddr != { 10.0.0.5 } drop
\t}
}
table inet minicloud_sg {
\tset g_sg_default {
\t\ttype ifname . ipv4_addr
\t\telements = { "mcb-00002a" . 10.0.0.5, "mcb-00002a" . 10.0.0.9, "mcb-00002a" . 10.0.0.12 }
\t}
\tmap out {
\t\ttype ifname . ipv4_addr : verdict
\t\telements = { "mcb-00002a" . 10.0.0.5 : jump o_nic_1 }
\t}
\tmap into {
\t\ttype ifname . ipv4_addr : verdict
\t\telements = { "mcb-00002a" . 10.0.0.5 : jump i_nic_1 }
\t}
\tmap zones {
\t\ttypeof iifname : ct zone
\t\telements = { "mcb-00002a" : 42 }
\t}
\tchain prerouting {
\t\ttype filter hook prerouting priority -300; policy accept;
\t\tct zone set iifname map @zones
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\tiifname . ip saddr vmap @out
\t\toifname . ip daddr vmap @into
\t}
\tchain egress_ok {
\t\toifname . ip daddr vmap @into
\t\taccept
\t}
\tchain ge_sg_default {
\t\tgoto egress_ok
\t}
\tchain gi_sg_default {
\t\tiifname . ip saddr @g_sg_default accept
\t}
\tchain ge_sg_web {
\t\tgoto egress_ok
\t}
\tchain gi_sg_web {
\t\ttcp dport 80 accept
\t\tip saddr 192.168.0.0/16 tcp dport 8000-8080 accept
\t\tip protocol icmp accept
\t\tiifname . ip saddr @g_sg_default ip protocol udp accept
\t}
\tchain o_nic_1 {
\t\tudp sport 68 udp dport 67 goto egress_ok
\t\tct state established,related goto egress_ok
\t\tct state invalid drop
\t\tjump ge_sg_default
\t\tjump ge_sg_web
\t\tdrop
\t}
\tchain i_nic_1 {
\t\tudp sport 67 udp dport 68 accept
\t\tct state established,related accept
\t\tct state invalid drop
\t\tjump gi_sg_default
\t\tjump gi_sg_web
\t\tdrop
\t}
}
"""
    )


def test_golden_a_port_without_address_or_group_only_sends_dhcp_discovery_and_has_no_stateful_chains():
    empty = Group("sg-empty")
    port = Port("nic-2", "tap2", "52:54:00:00:00:02", (), ())
    assert (
        compile_rules([empty], [port])
        == """\
table bridge minicloud_sg {}
delete table bridge minicloud_sg
table inet minicloud_sg {}
delete table inet minicloud_sg
table bridge minicloud_sg {
\tmap spoof {
\t\ttype ifname : verdict
\t\telements = { "tap2" : jump o_nic_2 }
\t}
\tset taps {
\t\ttype ifname
\t\telements = { "tap2" }
\t}
\tchain prerouting {
\t\ttype filter hook prerouting priority -300; policy accept;
\t\tiifname vmap @spoof
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\toifname @taps ether type != { ip, arp } drop
\t}
\tchain o_nic_2 {
\t\tether saddr != 52:54:00:00:00:02 drop
\t\tether type arp arp saddr ether != 52:54:00:00:00:02 drop
\t\tether type arp drop
\t\tether type != ip drop
\t\tip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept
\t\tdrop
\t}
}
table inet minicloud_sg {
\tmap out {
\t\ttype ifname . ipv4_addr : verdict
\t}
\tmap into {
\t\ttype ifname . ipv4_addr : verdict
\t}
\tmap zones {
\t\ttypeof iifname : ct zone
\t}
\tchain prerouting {
\t\ttype filter hook prerouting priority -300; policy accept;
\t\tct zone set iifname map @zones
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\tiifname . ip saddr vmap @out
\t\toifname . ip daddr vmap @into
\t}
\tchain egress_ok {
\t\toifname . ip daddr vmap @into
\t\taccept
\t}
}
"""
    )


# -- incremental changes: one transaction touching only what differs ----------------------------------------------
NIC2 = Port("nic-2", "tap2", "52:54:00:00:00:02", ("10.0.0.9",), ("sg-default",), "mcb-00002a", 42)


def test_golden_delta_a_port_added_gets_its_chains_and_elements_and_nothing_else():
    old = build([WEB, DEFAULT], [NIC1])
    assert delta_script(old, build([WEB, DEFAULT], [NIC1, NIC2])) == (
        "add chain bridge minicloud_sg o_nic_2\n"
        "add chain inet minicloud_sg o_nic_2\n"
        "add chain inet minicloud_sg i_nic_2\n"
        "add rule bridge minicloud_sg o_nic_2 ether saddr != 52:54:00:00:00:02 drop\n"
        "add rule bridge minicloud_sg o_nic_2 ether type arp arp saddr ether != 52:54:00:00:00:02 drop\n"
        "add rule bridge minicloud_sg o_nic_2 ether type arp arp saddr ip != { 10.0.0.9 } drop\n"
        "add rule bridge minicloud_sg o_nic_2 ether type arp accept\n"
        "add rule bridge minicloud_sg o_nic_2 ether type != ip drop\n"
        "add rule bridge minicloud_sg o_nic_2 ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n"
        "add rule bridge minicloud_sg o_nic_2 ip saddr != { 10.0.0.9 } drop\n"
        "add rule inet minicloud_sg o_nic_2 udp sport 68 udp dport 67 goto egress_ok\n"
        "add rule inet minicloud_sg o_nic_2 ct state established,related goto egress_ok\n"
        "add rule inet minicloud_sg o_nic_2 ct state invalid drop\n"
        "add rule inet minicloud_sg o_nic_2 jump ge_sg_default\n"
        "add rule inet minicloud_sg o_nic_2 drop\n"
        "add rule inet minicloud_sg i_nic_2 udp sport 67 udp dport 68 accept\n"
        "add rule inet minicloud_sg i_nic_2 ct state established,related accept\n"
        "add rule inet minicloud_sg i_nic_2 ct state invalid drop\n"
        "add rule inet minicloud_sg i_nic_2 jump gi_sg_default\n"
        "add rule inet minicloud_sg i_nic_2 drop\n"
        'add element bridge minicloud_sg spoof { "tap2" : jump o_nic_2 }\n'
        'add element bridge minicloud_sg taps { "tap2" }\n'
        'add element inet minicloud_sg out { "mcb-00002a" . 10.0.0.9 : jump o_nic_2 }\n'
        'add element inet minicloud_sg into { "mcb-00002a" . 10.0.0.9 : jump i_nic_2 }\n'
    )


def test_golden_delta_a_rule_change_rewrites_its_groups_chain_and_a_member_change_one_element():
    old = build([WEB, DEFAULT], [NIC1, NIC2])
    web = Group("sg-web", (*WEB.rules, Rule("ingress", "tcp", 443)), WEB.members)
    default = Group("sg-default", DEFAULT.rules, _on(BR, "10.0.0.12", "10.0.0.5", "10.0.0.9", "10.0.0.77"))
    assert delta_script(old, build([web, default], [NIC1, NIC2])) == (
        'add element inet minicloud_sg g_sg_default { "mcb-00002a" . 10.0.0.77 }\n'
        "flush chain inet minicloud_sg gi_sg_web\n"
        "add rule inet minicloud_sg gi_sg_web tcp dport 80 accept\n"
        "add rule inet minicloud_sg gi_sg_web ip saddr 192.168.0.0/16 tcp dport 8000-8080 accept\n"
        "add rule inet minicloud_sg gi_sg_web ip protocol icmp accept\n"
        "add rule inet minicloud_sg gi_sg_web iifname . ip saddr @g_sg_default ip protocol udp accept\n"
        "add rule inet minicloud_sg gi_sg_web tcp dport 443 accept\n"
    )
    assert delta_script(old, old) == ""


def test_golden_delta_a_port_removed_loses_its_elements_before_its_chains_and_unused_groups_go_last():
    old = build([WEB, DEFAULT], [NIC1, NIC2])
    assert delta_script(old, build([WEB, DEFAULT], [NIC2])) == (
        'delete element bridge minicloud_sg spoof { "tap1" }\n'
        'delete element bridge minicloud_sg taps { "tap1" }\n'
        'delete element inet minicloud_sg out { "mcb-00002a" . 10.0.0.5 }\n'
        'delete element inet minicloud_sg into { "mcb-00002a" . 10.0.0.5 }\n'
        "delete chain bridge minicloud_sg o_nic_1\n"
        "delete chain inet minicloud_sg i_nic_1\n"
        "delete chain inet minicloud_sg o_nic_1\n"
        "delete chain inet minicloud_sg gi_sg_web\n"
        "delete chain inet minicloud_sg ge_sg_web\n"
    )


def test_golden_delta_a_moved_address_replaces_its_map_elements_and_rewrites_its_spoofing_chain():
    old = build([DEFAULT], [NIC2])
    moved = Port("nic-2", "tap2", "52:54:00:00:00:02", ("10.0.0.10",), ("sg-default",), "mcb-00002a", 42)
    assert delta_script(old, build([DEFAULT], [moved])) == (
        "flush chain bridge minicloud_sg o_nic_2\n"
        "add rule bridge minicloud_sg o_nic_2 ether saddr != 52:54:00:00:00:02 drop\n"
        "add rule bridge minicloud_sg o_nic_2 ether type arp arp saddr ether != 52:54:00:00:00:02 drop\n"
        "add rule bridge minicloud_sg o_nic_2 ether type arp arp saddr ip != { 10.0.0.10 } drop\n"
        "add rule bridge minicloud_sg o_nic_2 ether type arp accept\n"
        "add rule bridge minicloud_sg o_nic_2 ether type != ip drop\n"
        "add rule bridge minicloud_sg o_nic_2 ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n"
        "add rule bridge minicloud_sg o_nic_2 ip saddr != { 10.0.0.10 } drop\n"
        'delete element inet minicloud_sg out { "mcb-00002a" . 10.0.0.9 }\n'
        'delete element inet minicloud_sg into { "mcb-00002a" . 10.0.0.9 }\n'
        'add element inet minicloud_sg out { "mcb-00002a" . 10.0.0.10 : jump o_nic_2 }\n'
        'add element inet minicloud_sg into { "mcb-00002a" . 10.0.0.10 : jump i_nic_2 }\n'
    )


def test_a_delta_from_an_empty_ruleset_declares_new_sets_before_the_chains_that_name_them():
    old = build([DEFAULT], [])
    script = delta_script(old, build([DEFAULT], [NIC2]))
    assert script.startswith(
        "add set inet minicloud_sg g_sg_default { type ifname . ipv4_addr; }\n"
        'add element inet minicloud_sg g_sg_default { "mcb-00002a" . 10.0.0.5, "mcb-00002a" . 10.0.0.9, '
        '"mcb-00002a" . 10.0.0.12 }\n'
        "add chain bridge minicloud_sg o_nic_2\n"
    )
    assert script.index("add chain inet minicloud_sg gi_sg_default") < script.index("jump gi_sg_default")
    back = delta_script(build([DEFAULT], [NIC2]), old)
    assert back.endswith("delete chain inet minicloud_sg ge_sg_default\ndelete set inet minicloud_sg g_sg_default\n")


def test_output_is_deterministic_whatever_the_input_order():
    nic2 = Port("nic-0", "tap0", "52:54:00:00:00:01", ("10.0.0.9",), ("sg-default",), "mcb-00002a")
    assert compile_rules([WEB, DEFAULT], [NIC1, nic2]) == compile_rules([DEFAULT, WEB], [nic2, NIC1])
    text = compile_rules(
        [DEFAULT], [nic2, Port("nic-9", "tap9", "52:54:00:00:00:09", ("10.0.0.12",), bridge="mcb-00002a")]
    )
    assert text.index("chain o_nic_0") < text.index("chain o_nic_9")
    assert text.index("chain i_nic_0") < text.index("chain i_nic_9")


@pytest.mark.parametrize(
    ("groups", "ports", "message"),
    [
        ([DEFAULT], [NIC1], "sg-web, which is not among"),
        ([DEFAULT, DEFAULT], [], "twice"),
        (
            [Group("g", (Rule("ingress", remote_group="nope"),))],
            [Port("p", "t", "52:54:00:00:00:01", (), ("g",))],
            "nope",
        ),
        ([DEFAULT], [Port("p", "t", "52:54:00:00:00:0G", (), ())], "MAC"),
        ([DEFAULT], [Port("p", 'a" drop', "52:54:00:00:00:01", (), ())], "interface"),
        (
            [Group("g", (Rule("ingress", "tcp", 90, 80),))],
            [Port("p", "t", "52:54:00:00:00:01", ("10.0.0.1",), ("g",), "br0")],
            "port range",
        ),
        (
            [Group("g", (Rule("ingress", "icmp", 8),))],
            [Port("p", "t", "52:54:00:00:00:01", ("10.0.0.1",), ("g",), "br0")],
            "no ports",
        ),
        ([DEFAULT], [Port("p", "t", "52:54:00:00:00:01", ("10.0.0.1",), (), "")], "bridge"),
        (
            [DEFAULT],
            [
                Port("p", "t", "52:54:00:00:00:01", ("10.0.0.1",), (), "br0"),
                Port("q", "u", "52:54:00:00:00:02", ("10.0.0.1",), (), "br0"),
            ],
            "both have 10.0.0.1 on br0",
        ),
        (
            [DEFAULT],
            [
                Port("p", "t", "52:54:00:00:00:01", ("10.0.0.1",), (), "br0"),
                Port("q", "t", "52:54:00:00:00:02", ("10.0.0.2",), (), "br0"),
            ],
            "both have the tap t",
        ),
    ],
)
def test_what_would_make_an_invalid_ruleset_is_a_value_error(groups, ports, message):
    with pytest.raises(ValueError, match=message):
        compile_rules(groups, ports)


def test_each_networks_bridge_puts_its_traffic_in_the_networks_conntrack_zone():
    from minicloud.network.secgroup_compile import conntrack_zone

    assert [conntrack_zone(v) for v in (1, 4096, 65535, 65536, 16777215)] == [1, 4096, 65535, 1, 255]
    a = Port("nic-a", "tapa", "52:54:00:00:00:0a", ("10.0.0.5",), ("sg-default",), "mcb-001000", 4096)
    b = Port("nic-b", "tapb", "52:54:00:00:00:0b", ("10.0.0.5",), ("sg-default",), "mcb-001001", 4097)
    one, two = build([DEFAULT], [a]), build([DEFAULT], [a, b])
    assert two.zones == {'"mcb-001000"': "4096", '"mcb-001001"': "4097"}  # the same CIDR, two zones
    assert delta_script(one, two).splitlines()[-1] == 'add element inet minicloud_sg zones { "mcb-001001" : 4097 }'
    assert 'delete element inet minicloud_sg zones { "mcb-001001" }' in delta_script(two, one)
    with pytest.raises(ValueError, match="zones 4096 and 7"):
        build([DEFAULT], [a, Port("nic-c", "tapc", "52:54:00:00:00:0c", ("10.0.0.6",), (), "mcb-001000", 7)])


def test_group_members_are_bridge_and_address_so_the_same_address_in_another_network_is_not_a_member():
    """Two networks of one project with the same CIDR: a member at 10.0.0.5 on one bridge does not make 10.0.0.5
    on the other bridge a member (the set is keyed by bridge and address, matched with the packet's bridge)."""
    other = "mcb-00002b"
    default = Group(DEFAULT.id, DEFAULT.rules, (*_on(other, "10.0.0.5"), *_on(BR, "10.0.0.5", "10.0.0.5")))
    rs = build([default], [NIC2])
    assert rs.sets["g_sg_default"] == ('"mcb-00002a" . 10.0.0.5', '"mcb-00002b" . 10.0.0.5')  # sorted, deduplicated
    assert rs.chains["gi_sg_default"] == ("iifname . ip saddr @g_sg_default accept",)
    egress = Group("sg-e", (Rule("egress", "tcp", 22, remote_group="sg-e"),), _on(BR, "10.0.0.9"))
    nic = Port("nic-3", "tap3", "52:54:00:00:00:03", ("10.0.0.9",), ("sg-e",), BR)
    assert build([egress], [nic]).chains["ge_sg_e"] == ("oifname . ip daddr @g_sg_e tcp dport 22 goto egress_ok",)
    with pytest.raises(ValueError, match="not an interface name"):
        build([Group(DEFAULT.id, DEFAULT.rules, (("bad bridge!", "10.0.0.5"),))], [NIC2])


# -- the default bridge's guests: anti-spoofing only ------------------------------------------------------------------
GUEST = Port("i-guest1", "mcg-0123456789", "52:9a:00:00:00:07", ("10.213.0.10",), bridge="mcbr0", stateful=False)


def test_a_default_bridge_guest_is_pinned_to_its_mac_and_address_and_has_nothing_stateful():
    """The same chain as a VPC port's in ``bridge minicloud_sg`` (its MAC, ARP for its own address, IPv4 from it,
    DHCP discovery); nothing in ``inet minicloud_sg``: no ``out``/``into`` element, no chain, no zone."""
    rs = build([WEB, DEFAULT], [NIC1, GUEST])
    assert rs.spoof['"mcg-0123456789"'] == "jump o_i_guest1"
    assert rs.bridge_chains["o_i_guest1"] == (
        "ether saddr != 52:9a:00:00:00:07 drop",
        "ether type arp arp saddr ether != 52:9a:00:00:00:07 drop",
        "ether type arp arp saddr ip != { 10.213.0.10 } drop",
        "ether type arp accept",
        "ether type != ip drop",
        "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
        "ip saddr != { 10.213.0.10 } drop",
    )
    assert rs == build([WEB, DEFAULT], [NIC1, GUEST]) and "mcbr0" not in str((rs.out, rs.into, rs.zones))
    alone = build([WEB, DEFAULT], [NIC1])
    assert [rs.out, rs.into, rs.zones, rs.sets, rs.chains] == [
        alone.out,
        alone.into,
        alone.zones,
        alone.sets,
        alone.chains,
    ]
    # its groups are ignored, even unknown ones: the default bridge has none
    assert build([], [dataclasses.replace(GUEST, groups=("sg-gone",), zone=7)]).chains == {
        "egress_ok": ("oifname . ip daddr vmap @into", "accept")
    }


def test_golden_delta_a_default_bridge_guest_started_and_stopped_touches_the_bridge_table_only():
    old = build([DEFAULT], [NIC2])
    new = build([DEFAULT], [NIC2, GUEST])
    assert delta_script(old, new) == (
        "add chain bridge minicloud_sg o_i_guest1\n"
        "add rule bridge minicloud_sg o_i_guest1 ether saddr != 52:9a:00:00:00:07 drop\n"
        "add rule bridge minicloud_sg o_i_guest1 ether type arp arp saddr ether != 52:9a:00:00:00:07 drop\n"
        "add rule bridge minicloud_sg o_i_guest1 ether type arp arp saddr ip != { 10.213.0.10 } drop\n"
        "add rule bridge minicloud_sg o_i_guest1 ether type arp accept\n"
        "add rule bridge minicloud_sg o_i_guest1 ether type != ip drop\n"
        "add rule bridge minicloud_sg o_i_guest1 ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n"
        "add rule bridge minicloud_sg o_i_guest1 ip saddr != { 10.213.0.10 } drop\n"
        'add element bridge minicloud_sg spoof { "mcg-0123456789" : jump o_i_guest1 }\n'
        'add element bridge minicloud_sg taps { "mcg-0123456789" }\n'
    )
    assert delta_script(new, old) == (
        'delete element bridge minicloud_sg spoof { "mcg-0123456789" }\n'
        'delete element bridge minicloud_sg taps { "mcg-0123456789" }\n'
        "delete chain bridge minicloud_sg o_i_guest1\n"
    )
