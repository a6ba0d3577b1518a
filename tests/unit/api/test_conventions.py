"""The API conventions every resource follows, proven on key pairs: problems, idempotency, concurrency, paging."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import make_ssh_key

PROBLEM = "application/problem+json"


async def problem(resp, status):
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM
    body = await resp.json()
    assert body["status"] == status
    assert body["type"].startswith("https://minicloud.dev/problems/")
    assert body["title"] and body["detail"]
    assert "Traceback" not in body["detail"]
    return body


async def create(api, name, key=None, **extra):
    return await api.post("/v1/keypairs", json={"name": name, "public_key": key or make_ssh_key(), **extra})


async def test_create_show_list_delete_roundtrip(api, ssh_key):
    resp = await create(api, "laptop", ssh_key, labels={"owner": "ann"})
    assert resp.status == 201
    kp = await resp.json()
    assert kp["id"].startswith("kp-") and kp["fingerprint"].startswith("SHA256:")
    assert resp.headers["Location"] == f"/v1/keypairs/{kp['id']}"
    assert resp.headers["ETag"] == f'"{kp["revision"]}"'
    for ref in (kp["id"], "laptop"):
        shown = await (await api.get(f"/v1/keypairs/{ref}")).json()
        assert shown == kp
    listed = await (await api.get("/v1/keypairs")).json()
    assert [k["name"] for k in listed["items"]] == ["laptop"]
    assert (await api.delete("/v1/keypairs/laptop")).status == 204
    await problem(await api.get("/v1/keypairs/laptop"), 404)


BAD_BODIES = [
    ("malformed json", b'{"name": "a",', 400, None),
    ("invalid utf-8", b'{"name": "\xff\xfe", "public_key": "x"}', 400, None),
    ("not an object", b"[1, 2, 3]", 422, None),
    ("unknown field", b'{"name": "a", "public_key": "%K", "colour": "red"}', 422, "colour"),
    ("wrong type", b'{"name": 12, "public_key": "%K"}', 422, "name"),
    ("missing field", b'{"name": "a"}', 422, "public_key"),
    ("path traversal in name", b'{"name": "../../etc/passwd", "public_key": "%K"}', 422, "name"),
    ("sql metacharacters in name", b'{"name": "a\'; DROP TABLE records;--", "public_key": "%K"}', 422, "name"),
    ("name too long", b'{"name": "' + b"a" * 64 + b'", "public_key": "%K"}', 422, "name"),
    ("control characters in name", b'{"name": "a\\u0000b", "public_key": "%K"}', 422, "name"),
    (
        "deep nesting",
        b'{"name": "a", "public_key": "%K", "labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        422,
        "labels",
    ),
    ("bad label key", b'{"name": "a", "public_key": "%K", "labels": {"Bad Key!": "v"}}', 422, "labels"),
    ("malformed ssh key", b'{"name": "a", "public_key": "ssh-ed25519 AAAA@@@"}', 422, "public_key"),
    ("private key pasted", b'{"name": "a", "public_key": "-----BEGIN OPENSSH PRIVATE KEY-----"}', 422, "public_key"),
    ("empty body", b"", 400, None),
]


@pytest.mark.parametrize(("case", "body", "status", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_bodies_get_a_problem_that_names_the_fault_and_create_nothing(
    api, ssh_key, case, body, status, field
):
    body = body.replace(b"%K", ssh_key.encode())
    resp = await api.post("/v1/keypairs", data=body, headers={"Content-Type": "application/json"})
    p = await problem(resp, status)
    if field:
        assert any(field in param["name"] for param in p["invalid_params"]), p
    assert (await (await api.get("/v1/keypairs")).json())["items"] == []


async def test_a_10_mb_body_is_refused_with_413(api):
    big = b'{"name": "a", "public_key": "' + b"A" * (10 * 1024 * 1024) + b'"}'
    resp = await api.post("/v1/keypairs", data=big, headers={"Content-Type": "application/json"})
    p = await problem(resp, 413)
    assert "max_body_bytes" in p["detail"]


async def test_a_chunked_body_over_the_limit_is_refused_with_413(api):
    async def chunks():
        yield b'{"name": "a", "public_key": "'
        for _ in range(40):
            yield b"A" * 65536
        yield b'"}'

    resp = await api.post("/v1/keypairs", data=chunks(), headers={"Content-Type": "application/json"})
    await problem(resp, 413)


async def test_wrong_content_type_is_415(api, ssh_key):
    resp = await api.post(
        "/v1/keypairs",
        data=f"name=a&public_key={ssh_key}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    p = await problem(resp, 415)
    assert "application/json" in p["detail"]


@pytest.mark.parametrize(
    ("query", "field"),
    [("limit=0", "limit"), ("limit=abc", "limit"), ("limit=5000", "limit"), ("cursor=%%%", "cursor"),
     ("colour=red", "colour"), ("label=Bad!", "label"), ("limit=1&limit=2", "limit")],
)  # fmt: skip
async def test_bad_query_parameters_are_422(api, query, field):
    p = await problem(await api.get(f"/v1/keypairs?{query}"), 422)
    assert any(field in param["name"] for param in p["invalid_params"]), p


async def test_unknown_paths_and_methods_are_problems(api):
    p = await problem(await api.get("/v1/nothing-here"), 404)
    assert "openapi" in p["detail"]
    p = await problem(await api.request("PUT", "/v1/keypairs"), 405)
    assert "GET" in p["detail"] and "POST" in p["detail"]


async def test_traversal_and_oddities_in_path_refs_are_404(api):
    for ref in ("..%2F..%2Fetc%2Fpasswd", "%00", "a'%20OR%20'1'='1", "x" * 300):
        await problem(await api.get(f"/v1/keypairs/{ref}"), 404)


async def test_duplicate_name_is_409_and_leaves_the_first(api):
    first = await (await create(api, "dup")).json()
    p = await problem(await create(api, "dup"), 409)
    assert "already exists" in p["detail"]
    assert (await (await api.get("/v1/keypairs/dup")).json())["id"] == first["id"]


async def test_idempotency_key_replays_the_first_response(api, ssh_key):
    h = {"Idempotency-Key": "k-123"}
    body = {"name": "idem", "public_key": ssh_key}
    r1 = await api.post("/v1/keypairs", json=body, headers=h)
    r2 = await api.post("/v1/keypairs", json=body, headers=h)
    assert r1.status == r2.status == 201
    assert await r1.json() == await r2.json()
    assert r2.headers.get("Idempotent-Replayed") == "true"
    assert len((await (await api.get("/v1/keypairs")).json())["items"]) == 1


async def test_idempotency_key_replays_even_after_the_resource_changed(api, ssh_key):
    h = {"Idempotency-Key": "k-456"}
    body = {"name": "idem2", "public_key": ssh_key}
    first = await (await api.post("/v1/keypairs", json=body, headers=h)).json()
    await api.patch("/v1/keypairs/idem2", json={"description": "changed"})
    again = await (await api.post("/v1/keypairs", json=body, headers=h)).json()
    assert again == first


async def test_idempotency_key_reused_for_another_request_is_422(api):
    h = {"Idempotency-Key": "k-789"}
    assert (await api.post("/v1/keypairs", json={"name": "x1", "public_key": make_ssh_key()}, headers=h)).status == 201
    p = await problem(await api.post("/v1/keypairs", json={"name": "x2", "public_key": make_ssh_key()}, headers=h), 422)
    assert "Idempotency-Key" in p["detail"]


async def test_concurrent_requests_with_one_idempotency_key_create_once(api, ssh_key):
    h = {"Idempotency-Key": "race"}
    body = {"name": "race", "public_key": ssh_key}
    resps = await asyncio.gather(*(api.post("/v1/keypairs", json=body, headers=h) for _ in range(8)))
    bodies = [await r.json() for r in resps]
    assert {r.status for r in resps} == {201}
    assert len({b["id"] for b in bodies}) == 1


async def test_if_match_gives_optimistic_concurrency(api):
    kp = await (await create(api, "cas")).json()
    rev = kp["revision"]
    ok = await api.patch("/v1/keypairs/cas", json={"description": "one"}, headers={"If-Match": f'"{rev}"'})
    assert ok.status == 200
    new = await ok.json()
    assert new["description"] == "one" and new["revision"] > rev and new["public_key"] == kp["public_key"]
    await problem(
        await api.patch("/v1/keypairs/cas", json={"description": "two"}, headers={"If-Match": f'"{rev}"'}), 412
    )
    await problem(await api.delete("/v1/keypairs/cas", headers={"If-Match": f'"{rev}"'}), 412)
    await problem(
        await api.patch("/v1/keypairs/cas", json={"description": "x"}, headers={"If-Match": "yesterday"}), 400
    )
    assert (await api.delete("/v1/keypairs/cas", headers={"If-Match": f'"{new["revision"]}"'})).status == 204


async def test_patch_is_a_merge_patch_and_rejects_immutable_fields(api):
    await create(api, "mp", labels={"a": "1"})
    resp = await api.patch("/v1/keypairs/mp", json={"labels": {"b": "2"}})
    assert (await resp.json())["labels"] == {"b": "2"}
    p = await problem(await api.patch("/v1/keypairs/mp", json={"public_key": "ssh-ed25519 AAAA"}), 422)
    assert p["invalid_params"][0]["name"] == "public_key"


async def test_pagination_walks_every_item_once(api):
    names = [f"k{i:02d}" for i in range(7)]
    await asyncio.gather(*(create(api, n) for n in names))
    seen, cursor, pages = [], None, 0
    while True:
        q = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await (await api.get(f"/v1/keypairs{q}")).json()
        seen += [i["name"] for i in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == names and pages == 3


async def test_filters_by_name_and_label(api):
    await create(api, "a", labels={"env": "prod", "team": "x"})
    await create(api, "b", labels={"env": "dev"})
    await create(api, "c", labels={"env": "prod"})
    names = lambda page: [i["name"] for i in page["items"]]  # noqa: E731
    assert names(await (await api.get("/v1/keypairs?label=env=prod")).json()) == ["a", "c"]
    assert names(await (await api.get("/v1/keypairs?label=env=prod,team=x")).json()) == ["a"]
    assert names(await (await api.get("/v1/keypairs?name=b")).json()) == ["b"]
