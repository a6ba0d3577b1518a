"""Custom roles can be deleted once nothing uses them (issue 9 §2.8)."""

from __future__ import annotations

from minicloud.cli.main import build_parser
from minicloud.cli.user import delete_role


async def test_a_custom_role_is_deleted_only_when_unbound_and_built_in_roles_never(api):
    role = {"name": "keyreader", "allow": ["compute:keypairs:get"]}
    assert (await api.post("/v1/roles", json=role)).status == 201
    assert (await api.post("/v1/users", json={"name": "kim"})).status == 201
    grant = await api.post(
        "/v1/rolebindings", json={"role": "keyreader", "principal": "user:kim", "scope_project": "default"}
    )
    binding = await grant.json()

    busy = await api.delete("/v1/roles/keyreader")
    assert busy.status == 409
    detail = (await busy.json())["detail"]
    assert binding["id"] in detail and "kim" in detail

    assert (await api.delete(f"/v1/rolebindings/{binding['id']}")).status == 204
    assert (await api.delete("/v1/roles/keyreader")).status == 204
    names = [r["name"] for r in await (await api.get("/v1/roles")).json()]
    assert "keyreader" not in names
    assert (await api.delete("/v1/roles/keyreader")).status == 404
    for builtin in ("admin", "owner", "Viewer"):
        assert (await api.delete(f"/v1/roles/{builtin}")).status == 409


def test_role_delete_parses():
    args = build_parser().parse_args(["role", "delete", "keyreader"])
    assert args.func is delete_role and args.name == "keyreader"
