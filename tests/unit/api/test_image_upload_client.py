"""The client side of image upload: the SDK's ``client.images.upload`` and ``minicloud image import NAME PATH`` against
the daemon's own server (its Unix socket), and the rule that decides whether PATH is uploaded or read by the node."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from minicloud.cli.common import CommandError
from minicloud.cli.image import _progress, import_, uploads
from minicloud.cli.main import build_parser, main
from minicloud.client import ApiError, Client
from tests.unit.api.conftest import make_config

MIB = 1 << 20


@pytest.fixture
async def agent(tmp_path):
    """The daemon (agent.daemon.serve) with the fake hypervisor; yields its socket path."""
    from agent.daemon import serve

    cfg = make_config(tmp_path)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(cfg, stop))
    for _ in range(600):
        if (cfg.data_path / "agent.json").exists() or task.done():
            break
        await asyncio.sleep(0.05)
    assert (cfg.data_path / "agent.json").exists(), task
    yield SimpleNamespace(socket=cfg.agent.socket, images=cfg.data_path / "images")
    stop.set()
    await asyncio.wait_for(task, 60)


async def test_the_sdk_streams_a_file_with_its_checksum_and_reports_progress(agent, tmp_path):
    disk = tmp_path / "disk.raw"
    data = os.urandom(3 * MIB)
    disk.write_bytes(data)
    seen: list[tuple[str, int, int]] = []

    def upload():
        return Client.local(agent.socket).images.upload(
            "sdk", disk, labels={"env": "lab"}, progress=lambda *a: seen.append(a), idempotency_key="k"
        )

    image = await asyncio.to_thread(upload)
    assert image.name == "sdk" and image.sha256 == hashlib.sha256(data).hexdigest() and image.format == "raw"
    assert image.labels == {"env": "lab"} and image.source == "upload"
    assert seen[0] == ("hashing", 0, len(data)) and ("hashing", len(data), len(data)) in seen
    assert seen[-1] == ("uploading", len(data), len(data))
    # The same key: the first answer, not a conflict with its own result.
    assert (await asyncio.to_thread(upload)).id == image.id


async def test_the_sdk_surfaces_the_nodes_refusal_and_a_wrong_sha256(agent, tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(MIB))
    c = Client.local(agent.socket)
    await asyncio.to_thread(c.images.upload, "taken", disk)
    with pytest.raises(ApiError) as taken:
        await asyncio.to_thread(c.images.upload, "taken", disk)
    assert taken.value.status == 409
    with pytest.raises(ApiError) as wrong:
        await asyncio.to_thread(c.images.upload, "other", disk, sha256="0" * 64)
    assert wrong.value.status == 422
    taken_id = (await asyncio.to_thread(c.images.get, "taken")).id
    assert [p.name for p in agent.images.iterdir()] == [taken_id]


async def test_the_sdk_stops_sending_once_the_node_has_refused(agent, tmp_path):
    """A refusal comes before the body is read: the SDK sees it between chunks and sends no more of the file."""
    small, big = tmp_path / "small.raw", tmp_path / "big.raw"
    small.write_bytes(b"x" * 4096)
    with big.open("wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB announced, nothing on disk
    c = Client.local(agent.socket)
    await asyncio.to_thread(c.images.upload, "taken", small)
    sent: list[int] = []
    with pytest.raises(ApiError) as refused:
        await asyncio.to_thread(
            c.images.upload, "taken", big, sha256="0" * 64, progress=lambda phase, done, total: sent.append(done)
        )
    assert refused.value.status == 409
    assert max(sent) < 1 << 30


async def test_the_cli_uploads_with_upload_through_the_socket(agent, tmp_path):
    disk = tmp_path / "d.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"]
    await asyncio.to_thread(subprocess.run, create, check=True, timeout=60)
    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return main(["--socket", agent.socket, "-o", "json", "image", "import", "cli", str(disk), "--upload"])

    assert await asyncio.to_thread(run) == 0
    image = json.loads(out.getvalue())
    assert image["format"] == "qcow2" and image["virtual_size_bytes"] == 16 * MIB and image["source"] == "upload"


def _args(*argv: str):
    return build_parser().parse_args(["image", "import", *argv])


REMOTE = SimpleNamespace(socket_path=None)
SOCKET = SimpleNamespace(socket_path="/run/minicloud/minicloud.sock")


@pytest.mark.parametrize(
    ("argv", "client", "upload"),
    [
        (("n", "./disk.qcow2"), REMOTE, True),  # the form, over a remote: this machine's file
        (("n", "./disk.qcow2"), SOCKET, False),  # on the node: the node reads it, as it always did
        (("n", "./disk.qcow2", "--upload"), SOCKET, True),
        (("n", "/var/lib/minicloud/import/d.qcow2", "--node-path"), REMOTE, False),
        (("n", "https://example.org/d.qcow2"), REMOTE, False),  # a URL is the node's download
        (("n", "--kernel", "k", "--initrd", "i"), REMOTE, False),
    ],
)
def test_whether_import_uploads(argv, client, upload):
    assert uploads(_args(*argv), client) is upload  # type: ignore[arg-type]


def test_upload_and_node_path_exclude_each_other():
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        _args("n", "./d.qcow2", "--upload", "--node-path")


def test_a_missing_local_file_says_how_to_import_a_file_on_the_node(monkeypatch, tmp_path):
    monkeypatch.setattr("minicloud.cli.image.client", lambda args: Client(url="https://node.invalid:8443"))
    with pytest.raises(CommandError, match="--node-path"):
        import_(_args("n", str(tmp_path / "missing.qcow2")))
    with pytest.raises(CommandError, match="not a URL"):
        import_(_args("n", "https://example.org/d.qcow2", "--upload"))


def test_progress_shows_phase_percent_and_rate(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    show = _progress("debian")
    show("hashing", 0, 4 * MIB)
    show("uploading", 4 * MIB, 4 * MIB)
    text = err.getvalue()
    assert "checksumming debian:   0%" in text
    assert "uploading debian: 100% 4.0/4.0 MiB" in text and "MB/s" in text and "checking it" in text


def test_the_cli_is_quiet_without_a_terminal(monkeypatch, tmp_path: Path):
    """Not a TTY: no progress callback at all (nothing on stderr)."""
    calls = []

    class Images:
        def upload(self, name, path, **kw):
            calls.append(kw["progress"])
            raise CommandError("stop here")

    monkeypatch.setattr("minicloud.cli.image.client", lambda args: SimpleNamespace(socket_path=None, images=Images()))
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"x")
    with pytest.raises(CommandError):
        import_(_args("n", str(disk)))
    assert calls == [None]
