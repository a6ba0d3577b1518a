"""The overlay's pure parts: device names, input validation, and the FDB / neighbour / peer diff computation."""

from __future__ import annotations

import ipaddress

import pytest

from agent.net.overlay import (
    MAX_VNI,
    Delta,
    FdbEntry,
    Neighbour,
    OverlaySpec,
    bridge_name,
    diff,
    fdb_map,
    neighbour_map,
    peer_map,
    vxlan_name,
)

IP = ipaddress.IPv4Address


def test_device_names_are_deterministic_and_fit_ifnamsiz() -> None:
    assert (bridge_name(42), vxlan_name(42)) == ("mcb-00002a", "mcv-00002a")
    assert len(bridge_name(MAX_VNI)) <= 15 and len(vxlan_name(MAX_VNI)) <= 15
    spec = OverlaySpec(vni=42, local="10.0.0.1")
    assert (spec.bridge, spec.vxlan, spec.local, spec.mtu) == ("mcb-00002a", "mcv-00002a", IP("10.0.0.1"), 1450)


@pytest.mark.parametrize("kw", [{"vni": 0}, {"vni": MAX_VNI + 1}, {"mtu": 100}, {"local": "not-an-ip"}])
def test_bad_specs_are_refused(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"vni": 1, "local": "10.0.0.1", **kw}
    with pytest.raises(ValueError):
        OverlaySpec(**args)  # type: ignore[arg-type]


def test_entries_normalise_and_refuse_bad_input() -> None:
    assert FdbEntry("52-54-00-AA-BB-CC", "10.0.0.2").mac == "52:54:00:aa:bb:cc"
    assert Neighbour("10.1.0.5", "52:54:00:AA:BB:CC") == Neighbour(IP("10.1.0.5"), "52:54:00:aa:bb:cc")
    with pytest.raises(ValueError, match="set_peers"):
        FdbEntry("00:00:00:00:00:00", "10.0.0.2")
    with pytest.raises(ValueError):
        FdbEntry("52:54:00", "10.0.0.2")


def test_diff_adds_missing_removes_extra_and_replaces_changed() -> None:
    have = {"a": 1, "b": 2, "c": 3}
    want = {"b": 2, "c": 4, "d": 5}
    assert diff(have, want) == Delta(upsert={"c": 4, "d": 5}, remove=frozenset({"a"}))
    assert diff(want, want).empty
    assert diff({}, {}).empty
    assert diff(have, {}) == Delta(upsert={}, remove=frozenset(have))


def test_a_mac_that_moved_node_is_one_replace_not_a_remove() -> None:
    have = fdb_map([FdbEntry("52:54:00:00:00:01", "10.0.0.2"), FdbEntry("52:54:00:00:00:02", "10.0.0.3")])
    want = fdb_map([FdbEntry("52:54:00:00:00:01", "10.0.0.3")])
    delta = diff(have, want)
    assert delta.upsert == {"52:54:00:00:00:01": IP("10.0.0.3")}
    assert delta.remove == {"52:54:00:00:00:02"}


def test_conflicting_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="two nodes"):
        fdb_map([FdbEntry("52:54:00:00:00:01", "10.0.0.2"), FdbEntry("52:54:00:00:00:01", "10.0.0.3")])
    with pytest.raises(ValueError, match="two MACs"):
        neighbour_map([Neighbour("10.1.0.5", "52:54:00:00:00:01"), Neighbour("10.1.0.5", "52:54:00:00:00:02")])
    # Duplicates that agree are fine.
    assert len(fdb_map([FdbEntry("52:54:00:00:00:01", "10.0.0.2")] * 2)) == 1


def test_peers_diff_on_vteps() -> None:
    assert diff(peer_map(["10.0.0.2", "10.0.0.3"]), peer_map(["10.0.0.3", "10.0.0.4"])) == Delta(
        upsert={IP("10.0.0.4"): None}, remove=frozenset({IP("10.0.0.2")})
    )
