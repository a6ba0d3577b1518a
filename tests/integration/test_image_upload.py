"""Image upload against a real agent over HTTPS with an API key: the SDK streams a qcow2 from this machine, and
`minicloud image import NAME ./disk.qcow2` over a remote uploads the file from where the command runs. The record is
enough (nothing boots); a wrong checksum keeps nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from minicloud.client import ApiError
from tests.integration.conftest import REPO


@pytest.fixture
def disk(tmp_path):
    """A small qcow2 with 2 MiB of data in it (so the upload carries real clusters)."""
    raw = tmp_path / "data.raw"
    raw.write_bytes(os.urandom(2 << 20))
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(path)], check=True, timeout=60)
    return path


def test_upload_over_https_with_a_token_and_from_the_cli_over_a_remote(fresh_agent, disk, tmp_path):
    a = fresh_agent
    init = a.json("init")
    token, fp = init["secret"], init["ca_fingerprint"]
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()

    # The SDK over HTTPS, as any machine with the remote's token would.
    phases = set()
    image = a.https_client(token).images.upload(
        "over-https", disk, os_distro="test", progress=lambda phase, done, total: phases.add(phase)
    )
    assert (image.format, image.sha256, image.source, image.node) == ("qcow2", digest, "upload", a.info["node"])
    assert phases == {"hashing", "uploading"}
    stored = a.data_dir / "images" / image.id / "disk"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    with pytest.raises(ApiError) as wrong:
        a.https_client(token).images.upload("wrong", disk, sha256="0" * 64)
    assert wrong.value.status == 422 and "SHA-256" in wrong.value.problem.detail
    assert sorted(p.name for p in (a.data_dir / "images").iterdir()) == [image.id]
    # A refusal comes before the body is read; over TLS too, the SDK stops sending once it has come.
    big = tmp_path / "big.raw"
    with big.open("wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB announced
    sent: list[int] = []
    with pytest.raises(ApiError) as taken:
        a.https_client(token).images.upload(
            "over-https", big, sha256="0" * 64, progress=lambda phase, done, total: sent.append(done)
        )
    assert taken.value.status == 409 and max(sent) < 1 << 30

    # The form: `image import NAME ./disk.qcow2` from the directory holding the file, over a remote.
    a.cli("remote", "add", "lab", a.https, "--token", token, "--fingerprint", fp, check=True)
    done = subprocess.run(
        [sys.executable, "-m", "minicloud", "--remote", "lab", "-o", "json", "image", "import", "from-cli",
         "./disk.qcow2", "--description", "uploaded"],
        capture_output=True, text=True, env={**a.env, "PYTHONPATH": str(REPO)}, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no progress
    shown = json.loads(done.stdout)
    assert (shown["name"], shown["sha256"], shown["source"], shown["description"]) == (
        "from-cli",
        digest,
        "upload",
        "uploaded",
    )
    names = sorted(i["name"] for i in a.json("image", "list"))
    assert names == ["from-cli", "over-https"]
    # Through the node's own socket the same form still means a file on the node (refused: not under image_dirs).
    on_node = subprocess.run(
        [sys.executable, "-m", "minicloud", "--socket", str(a.socket), "image", "import", "n", "./disk.qcow2"],
        capture_output=True, text=True, env={**a.env, "PYTHONPATH": str(REPO)}, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert on_node.returncode == 1 and "image_dirs" in on_node.stderr
