"""The security-group compiler: golden nft output (the exact text the node applies with ``nft -f``): stateless
anti-spoofing in ``bridge minicloud_sg``, the stateful group rules in ``inet minicloud_sg``."""

from __future__ import annotations

import pytest

from minicloud.network.secgroup_compile import Group, Port, Rule, compile_rules

DEFAULT = Group(
    "sg-default",
    (Rule("egress", remote_cidr="0.0.0.0/0"), Rule("ingress", remote_group="sg-default")),
    ("10.0.0.12", "10.0.0.5", "10.0.0.9"),
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
    ("10.0.0.5",),
)
NIC1 = Port("nic-1", "tap1", "52:54:00:12:34:56", ("10.0.0.5",), ("sg-default", "sg-web"), "mcb-00002a")


def test_golden_two_groups_one_port():
    assert (
        compile_rules([WEB, DEFAULT], [NIC1])
        == """\
table bridge minicloud_sg {}
delete table bridge minicloud_sg
table inet minicloud_sg {}
delete table inet minicloud_sg
table bridge minicloud_sg {
\tchain prerouting {
\t\ttype filter hook prerouting priority -300; policy accept;
\t\tiifname "tap1" jump o_nic_1
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\toifname "tap1" ether type != { ip, arp } drop
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
\t\ttype ipv4_addr
\t\telements = { 10.0.0.5, 10.0.0.9, 10.0.0.12 }
\t}
\tset g_sg_web {
\t\ttype ipv4_addr
\t\telements = { 10.0.0.5 }
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\tiifname . ip saddr vmap { "mcb-00002a" . 10.0.0.5 : jump o_nic_1 }
\t\toifname . ip daddr vmap { "mcb-00002a" . 10.0.0.5 : jump i_nic_1 }
\t}
\tchain o_nic_1 {
\t\tudp sport 68 udp dport 67 return
\t\tct state established,related return
\t\tct state invalid drop
\t\treturn
\t\tdrop
\t}
\tchain i_nic_1 {
\t\tudp sport 67 udp dport 68 accept
\t\tct state established,related accept
\t\tct state invalid drop
\t\tip saddr @g_sg_default accept
\t\ttcp dport 80 accept
\t\tip saddr 192.168.0.0/16 tcp dport 8000-8080 accept
\t\tip protocol icmp accept
\t\tip saddr @g_sg_default ip protocol udp accept
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
\tchain prerouting {
\t\ttype filter hook prerouting priority -300; policy accept;
\t\tiifname "tap2" jump o_nic_2
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\toifname "tap2" ether type != { ip, arp } drop
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
\tset g_sg_empty {
\t\ttype ipv4_addr
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t}
}
"""
    )


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
    ],
)
def test_what_would_make_an_invalid_ruleset_is_a_value_error(groups, ports, message):
    with pytest.raises(ValueError, match=message):
        compile_rules(groups, ports)
