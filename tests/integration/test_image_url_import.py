"""`minicloud image import NAME URL` against a real agent: the CLI follows the import operation and prints the image;
refusals and failures are errors that say what to do. The image is served on 127.0.0.1, which the agent's operator
allows through compute.image_url_allow; nothing else is contacted."""

from __future__ import annotations

import functools
import hashlib
import http.server
import subprocess
import threading

import pytest

from tests.integration.conftest import Agent


@pytest.fixture
def served(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(www / "disk.qcow2"), "64M"], check=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield (
        f"http://127.0.0.1:{server.server_address[1]}/disk.qcow2",
        hashlib.sha256((www / "disk.qcow2").read_bytes()).hexdigest(),
    )
    server.shutdown()


def test_the_cli_imports_from_an_allowed_url_and_refuses_internal_ones(tmp_path, served):
    url, digest = served
    root = tmp_path / "node"
    root.mkdir()
    (root / "minicloud.toml").write_text(
        '[compute]\ndriver = "fake"\nimage_url_allow = ["127.0.0.1/32"]\n[network]\nenabled = false\n'
    )
    agent = Agent(root).start()
    try:
        image = agent.json("image", "import", "web", url, "--sha256", digest, "--os-distro", "debian")
        assert (image["name"], image["format"], image["sha256"]) == ("web", "qcow2", digest)
        assert image["os"] == {"distro": "debian"}
        done = agent.cli("image", "import", "bad", url, "--sha256", "0" * 64)
        assert done.returncode == 1 and "SHA-256" in done.stderr and "nothing was kept" in done.stderr
        done = agent.cli("image", "import", "meta", "http://169.254.169.254/latest/meta-data/")
        assert done.returncode == 1 and "compute.image_url_allow" in done.stderr
        assert [i["name"] for i in agent.json("image", "list")] == ["web"]
        op = agent.json("operation", "list")
        assert sorted(o["state"] for o in op if o["action"] == "image.import") == ["failed", "succeeded"]
    finally:
        agent.stop()
