"""One-time secrets (API keys, S3 access keys) are never at rest in clear, even in the reply an Idempotency-Key keeps
for a retry: not in any table of the store (the change log included), not in its WAL, not in a backup."""

from __future__ import annotations

import sqlite3

from minicloud.api.keys import CONFIG, STORE


def _every_row_as_text(db_path) -> str:
    """Every value of every table of the SQLite file, as text (blobs decoded leniently)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        parts = []
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert "changes" in tables  # the change log is scanned too
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):  # table names come from sqlite_master
                for value in row:
                    parts.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
        return "\n".join(parts)
    finally:
        db.close()


def _raw_files(data_dir) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("state.db*")))


async def test_a_retried_create_gets_its_secret_and_no_secret_is_stored_in_clear(api, tmp_path):
    h = {"Idempotency-Key": "lost-response-1"}
    first = await api.post("/v1/apikeys", json={"name": "ci"}, headers=h)
    again = await api.post("/v1/apikeys", json={"name": "ci"}, headers=h)
    assert first.status == again.status == 201
    key = await first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert (await again.json())["secret"] == key["secret"]  # the caller whose response was lost still gets it

    h = {"Idempotency-Key": "lost-response-2"}
    first = await api.post("/v1/accesskeys", json={"name": "s3"}, headers=h)
    again = await api.post("/v1/accesskeys", json={"name": "s3"}, headers=h)
    assert first.status == again.status == 201
    access = await first.json()
    assert (await again.json())["secret_access_key"] == access["secret_access_key"]
    assert again.headers.get("Idempotent-Replayed") == "true"

    # The bearer token's secret part, and the whole token; the S3 secret access key.
    secrets = [key["secret"], key["secret"].split(".", 1)[1], access["secret_access_key"]]
    data_dir = api.app[CONFIG].data_path
    rows = _every_row_as_text(data_dir / "state.db")
    raw = _raw_files(data_dir)  # the database, its WAL and shared memory, whatever is not checkpointed yet
    backup = tmp_path / "backup.db"
    await api.app[STORE].backup(backup)
    for secret in secrets:
        assert secret not in rows
        assert secret.encode() not in raw
        assert secret.encode() not in backup.read_bytes()
