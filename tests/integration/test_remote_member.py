"""First contact from another machine: a project member adds a remote over HTTPS and works in its project; `whoami`
tells every kind of principal who it is (the real agent, the real CLI in subprocesses, a fresh HOME per "machine")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import REPO, Agent

PASSWORD = "correct horse battery staple"


def laptop(home: Path):
    """A second machine: its own HOME (so its own ~/.config/minicloud), no local agent socket."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINICLOUD_", "XDG_"))}
    env.update(HOME=str(home), MINICLOUD_SOCKET=str(home / "no-agent-here.sock"))

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "minicloud", *args],
            capture_output=True, text=True, env=env, input=input, timeout=120, cwd=REPO,
        )  # fmt: skip
        assert not check or r.returncode == 0, f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    return run


def test_a_project_member_adds_a_remote_and_lists_its_projects_instances(fresh_agent: Agent, tmp_path: Path):
    a = fresh_agent
    init = a.json("init")
    a.cli("project", "create", "web", check=True)
    a.cli("user", "create", "mia", check=True)  # no terminal: no password, API keys only
    a.cli("--project", "web", "role", "grant", "member", "--user", "mia", check=True)
    key = a.json("--project", "web", "apikey", "create", "mia-laptop", "--user", "mia", "--expires-in", "86400")

    run = laptop(tmp_path / "mia")
    added = run("remote", "add", "lab", a.https, "--token", key["secret"], "--fingerprint", init["ca_fingerprint"])
    assert "member in web" in added.stdout and "expires" in added.stdout, added.stdout
    listed = json.loads(run("--remote", "lab", "--project", "web", "-o", "json", "instance", "list").stdout)
    assert listed == []
    me = json.loads(run("--remote", "lab", "-o", "json", "whoami").stdout)
    assert me["name"] == "mia" and me["kind"] == "user" and me["admin"] is False
    assert me["bindings"] == [{"role": "member", "project": "web"}] and me["projects"] == ["web"]
    assert me["credential"]["type"] == "apikey" and me["credential"]["expires_at"] == key["expires_at"]
    assert me["remote"] == "lab" and me["pinned_ca_fingerprint"] == init["ca_fingerprint"] == me["ca_fingerprint"]
    table = run("--remote", "lab", "whoami").stdout
    assert "member in web" in table and "lab (" in table and init["ca_fingerprint"] in table
    # What a member may not do is still refused, and says what is missing.
    denied = run("--remote", "lab", "node", "show", check=False)
    assert denied.returncode == 1 and "nodes:get" in denied.stderr


def test_whoami_for_admin_viewer_service_account_session_and_local_root(fresh_agent: Agent, tmp_path: Path):
    a = fresh_agent
    init = a.json("init")
    fp = init["ca_fingerprint"]
    root = a.json("whoami")  # the Unix socket
    assert root["principal"] == "local:root" and root["admin"] is True and root["credential"]["type"] == "socket"
    assert root["remote"] is None and root["endpoint"].startswith("unix:")

    admin = laptop(tmp_path / "admin")
    admin("remote", "add", "lab", a.https, "--token", init["secret"], "--fingerprint", fp)
    me = json.loads(admin("--remote", "lab", "-o", "json", "whoami").stdout)
    assert me["admin"] is True and {"role": "admin", "project": None} in me["bindings"]

    a.cli("user", "create", "vic", check=True)
    a.cli("role", "grant", "viewer", "--user", "vic", "--project", "default", check=True)
    a.cli("user", "create", "ci", "--service", check=True)
    a.cli("role", "grant", "member", "--serviceaccount", "ci", "--project", "default", check=True)
    for name, kind, role in (("vic", "user", "viewer"), ("ci", "serviceaccount", "member")):
        secret = a.json("apikey", "create", f"{name}-key", "--user", name)["secret"]
        run = laptop(tmp_path / name)
        run("remote", "add", "lab", a.https, "--token", secret, "--fingerprint", fp)
        me = json.loads(run("--remote", "lab", "-o", "json", "whoami").stdout)
        assert (me["name"], me["kind"], me["bindings"]) == (name, kind, [{"role": role, "project": "default"}])

    a.cli("user", "create", "sam", "--password-stdin", input=PASSWORD + "\n", check=True)
    a.cli("role", "grant", "owner", "--user", "sam", "--project", "default", check=True)
    run = laptop(tmp_path / "sam")
    run("remote", "add", "lab", a.https, "--fingerprint", fp)  # no token: logs in next
    run("--remote", "lab", "login", "sam", "--password-stdin", input=PASSWORD + "\n")
    me = json.loads(run("--remote", "lab", "-o", "json", "whoami").stdout)
    assert me["name"] == "sam" and me["credential"]["type"] == "session" and me["credential"]["expires_at"]
