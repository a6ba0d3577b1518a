"""``admin backup --bucket``'s upload: a refusal or an unreachable endpoint fails the operation saying the backup is
kept on the node and why the upload failed (not an internal error)."""

from __future__ import annotations

import pytest

from minicloud import backups, errors
from minicloud.objects.rgwclient import S3Error
from minicloud.storage import backup_schedules


class _Open:
    async def __aenter__(self):
        return object()

    async def __aexit__(self, *exc):
        return None


@pytest.mark.parametrize("exc", [S3Error(403, "AccessDenied", what="POST x"), ConnectionRefusedError(111, "refused")])
async def test_a_failed_upload_says_the_backup_is_kept(tmp_path, monkeypatch, exc):
    async def upload(s3, path, name):
        raise exc

    monkeypatch.setattr(backups, "_s3", lambda *a: _Open())
    monkeypatch.setattr(backup_schedules, "upload_state_file", upload)
    path = tmp_path / "backup-20260101T000000-0123abcd.db"
    path.write_bytes(b"x")
    place = backups.BucketPlace(project="default", bucket="cluster-state", target="btg-1")
    with pytest.raises(errors.Unavailable, match=r"kept on this node.*bucket 'cluster-state' of backup target btg-1"):
        await backups.to_bucket(None, None, None, place, path)
