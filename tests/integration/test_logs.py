"""Centralized logs with a real agent: ``minicloud logs --service agent --since 5m`` shows the agent's own lines
(from its log file); a project member reads only their instance's console with ``--instance`` (another project's
instance is 404, the agent's lines 403); ``--grep`` filters and a bad pattern is refused with grep's reason."""

from __future__ import annotations

import json

import pytest

from minicloud.client import ApiError
from tests.integration.conftest import Agent, wait_until


@pytest.fixture
def node(tmp_path):
    root = tmp_path / "node"
    root.mkdir()
    (root / "minicloud.toml").write_text(
        f'[compute]\ndriver = "fake"\nimage_dirs = ["{root / "import"}"]\n[network]\nenabled = false\n'
        "[metrics]\nenabled = false\n"
    )
    a = Agent(root).start()
    yield a
    if a.proc and a.proc.poll() is None:
        a.stop()


def _instance(admin, node: Agent, project: str, name: str) -> str:
    kernel = node.root / "import" / "vmlinuz"
    kernel.parent.mkdir(exist_ok=True)
    kernel.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    admin.project = project
    try:
        admin.images.get(f"k-{project}")
    except ApiError:
        admin.images.create(name=f"k-{project}", kernel=str(kernel))
    inst = admin.instances.create(name=name, type="m1.tiny", image=f"k-{project}")
    wait_until(f"{name} running", lambda: admin.instances.get(name).status.state == "running", 60)
    admin.project = None
    return inst.id


def test_logs_of_a_real_agent(node):
    out = node.cli("logs", "--service", "agent", "--since", "5m", check=True).stdout
    assert "minicloud agent ready" in out and " agent: " in out
    assert all(row.split()[2] == "agent:" for row in out.splitlines())  # TIME NODE SERVICE: LINE
    rows = node.json("logs", "--service", "agent", "--grep", "agent (ready|stopping)")["lines"]
    assert rows and all("agent ready" in r["line"] for r in rows)
    bad = node.cli("logs", "--grep", "(a)\\1")
    assert bad.returncode == 1 and "back-references" in bad.stderr

    admin = node.client()
    for project in ("pa", "pb"):
        admin.projects.create(name=project)
    a1 = _instance(admin, node, "pa", "a1")
    b1 = _instance(admin, node, "pb", "b1")
    for iid, text in ((a1, "a1 booted"), (b1, "b1 booted")):
        (node.data_dir / "instances" / iid / "console.log").write_text(f"{text}\nlogin:\n")
    admin.users.create(name="alice")
    admin.rolebindings.grant("member", "user:alice", "pa")
    secret = admin.apikeys.create(name="alice-key", user="alice").secret
    alice = node.https_client(secret)
    alice.project = "pa"
    got = alice.logs.read(instance="a1")
    assert [(ln.service, ln.instance, ln.line) for ln in got.lines] == [
        ("console", a1, "a1 booted"),
        ("console", a1, "login:"),
    ]
    for ref in ("b1", b1):  # by name in her project, and by its id
        with pytest.raises(ApiError) as refused:
            alice.logs.read(instance=ref)
        assert refused.value.status == 404
    with pytest.raises(ApiError) as refused:
        alice.logs.read(service="agent")
    assert refused.value.status == 403
    # the administrator sees both consoles, each with its instance
    rows = node.json("logs", "--service", "console", "--grep", "booted")["lines"]
    assert sorted((r["instance"], r["line"]) for r in rows) == sorted([(a1, "a1 booted"), (b1, "b1 booted")])
    # the audit log is a service too
    audit = node.json("logs", "--service", "audit", "--grep", "POST /v1/projects")["lines"]
    assert len(audit) == 2 and all(json.dumps(r).count("allowed") for r in audit)
