"""Access keys can be disabled, enabled again and given an expiry: what the objects reconciler turns into RGW key
modes (disabled or expired: refused by S3)."""

from __future__ import annotations

import datetime as _dt

import pytest

from minicloud import errors
from minicloud.api.keys import STORE
from minicloud.cli.main import build_parser
from minicloud.iam.accesskeys import expiry_of
from minicloud.model import AccessKeyCreate
from tests.unit.api.test_conventions import problem

NOW = _dt.datetime(2026, 11, 30, 12, 0, tzinfo=_dt.UTC)


def test_expiry_is_bounded_and_written_as_rfc3339_utc():
    assert expiry_of(AccessKeyCreate(name="k"), NOW) == ""
    assert expiry_of(AccessKeyCreate(name="k", expires_in=30 * 86400), NOW) == "2026-12-30T12:00:00.000Z"
    shifted = AccessKeyCreate(name="k", expires_at="2027-01-01T01:00:00+01:00")
    assert expiry_of(shifted, NOW) == "2027-01-01T00:00:00.000Z"
    bad = {
        "not both": AccessKeyCreate(name="k", expires_in=3600, expires_at="2027-01-01T00:00:00Z"),
        "in the past": AccessKeyCreate(name="k", expires_at="2026-11-29T00:00:00Z"),
        "10 years": AccessKeyCreate(name="k", expires_at="2037-01-01T00:00:00Z"),
        "RFC 3339": AccessKeyCreate(name="k", expires_at="next tuesday"),
        "time zone": AccessKeyCreate(name="k", expires_at="2027-01-01T00:00:00"),
    }
    for words, body in bad.items():
        with pytest.raises(errors.ValidationFailed, match=words):
            expiry_of(body, NOW)


async def test_disable_enable_and_expiry_over_http_are_shown_stored_and_audited(api):
    created = await (await api.post("/v1/accesskeys", json={"name": "s3", "expires_in": 86400})).json()
    key_id = created["id"]
    assert created["disabled"] is False and created["expires_at"] > "2026"
    disabled = await api.post(f"/v1/accesskeys/{key_id}/disable")
    assert disabled.status == 200 and (await disabled.json())["disabled"] is True
    assert (await api.app[STORE].get("accesskey", key_id)).spec["disabled"] is True  # what the reconciler reads
    shown = await (await api.get("/v1/accesskeys/s3")).json()
    assert shown["disabled"] is True and shown["expires_at"] == created["expires_at"]
    listed = (await (await api.get("/v1/accesskeys")).json())["items"]
    assert [(k["id"], k["disabled"]) for k in listed] == [(key_id, True)]
    enabled = await api.post("/v1/accesskeys/s3/enable")  # by name too
    assert enabled.status == 200 and (await enabled.json())["disabled"] is False
    audit = (await (await api.get("/v1/audit")).json())["items"]
    assert sum(1 for e in audit if key_id in str(e)) >= 3  # create, disable, enable
    await problem(await api.post("/v1/accesskeys/MCAKNOSUCHKEY2345678/disable"), 404)
    past = await api.post("/v1/accesskeys", json={"name": "old", "expires_at": "2020-01-01T00:00:00Z"})
    assert "in the past" in (await problem(past, 422))["detail"]
    await problem(await api.post("/v1/accesskeys", json={"name": "far", "expires_in": 11 * 365 * 86400}), 422)


def test_cli_parses_expiry_and_state_changes():
    parse = build_parser().parse_args
    args = parse(["accesskey", "create", "s3", "--expires-in", "30d"])
    assert args.expires_in == 30 * 86400 and args.expires_at is None
    args = parse(["accesskey", "create", "s3", "--expires-at", "2027-06-30T00:00:00Z"])
    assert args.expires_at == "2027-06-30T00:00:00Z" and args.expires_in is None
    for verb in ("disable", "enable"):
        args = parse(["accesskey", verb, "MCAKABCDEFGHIJKLMNOP"])
        assert (args.state, args.ref) == (verb, "MCAKABCDEFGHIJKLMNOP")
    for bad in (["--expires-in", "soon"], ["--expires-in", "1d", "--expires-at", "2027-01-01T00:00:00Z"]):
        with pytest.raises(SystemExit):
            parse(["accesskey", "create", "s3", *bad])
