"""The real daemon driven through the `minicloud` shell client, on the Unix socket and over HTTPS."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import subprocess
import uuid

import psutil
import yaml

from tests.conftest import make_ssh_key


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_node_show_reports_host_facts(agent):
    table = agent.cli("node", "show", check=True).stdout
    assert "virt type:" in table and "cpus:" in table
    node = agent.json("node", "show")
    assert node["cpu_count"] == psutil.cpu_count()
    assert node["memory_total_bytes"] == psutil.virtual_memory().total
    virt = node["virtualization"]
    assert virt["virt_type"] in ("kvm", "qemu") and virt["reason"]
    if not virt["hardware_virt"]:
        assert virt["virt_type"] == "qemu"


def test_socket_is_private_to_root(agent):
    mode = os.stat(agent.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_keypair_lifecycle_through_the_cli(agent, tmp_path):
    name = unique("kp")
    pub = tmp_path / "id.pub"
    pub.write_text(make_ssh_key("me@laptop") + "\n")
    created = agent.json("keypair", "import", name, str(pub), "--label", "env=test")
    assert created["name"] == name and created["labels"] == {"env": "test"} and created["comment"] == "me@laptop"
    table = agent.cli("keypair", "list", check=True).stdout
    assert table.splitlines()[0].split() == ["NAME", "TYPE", "FINGERPRINT", "ID"]
    assert any(line.startswith(name + " ") for line in table.splitlines())
    shown = yaml.safe_load(agent.cli("-o", "yaml", "keypair", "show", name, check=True).stdout)
    assert shown["fingerprint"] == created["fingerprint"]
    assert name in [k["name"] for k in agent.json("keypair", "list", "--label", "env=test")]
    dup = agent.cli("keypair", "import", name, str(pub))
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert agent.cli("keypair", "delete", name, check=True).stdout.startswith("Deleted")
    gone = agent.cli("keypair", "show", name)
    assert gone.returncode == 1 and "Error: no key pair" in gone.stderr


def test_keypair_import_reads_stdin(agent):
    name = unique("stdin")
    result = agent.cli("-o", "json", "keypair", "import", name, "-", input=make_ssh_key())
    assert result.returncode == 0 and json.loads(result.stdout)["name"] == name


def test_cli_errors_are_clear_and_non_zero(agent, tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-ed25519 not-base64!!\n")
    r = agent.cli("keypair", "import", "ok-name", str(bad))
    assert r.returncode == 1 and "public_key" in r.stderr and "Traceback" not in r.stderr
    r = agent.cli("keypair", "import", "../../etc/passwd", str(bad))
    assert r.returncode == 1 and "name" in r.stderr
    r = agent.cli("keypair", "import", "x", str(tmp_path / "missing.pub"))
    assert r.returncode == 1 and "cannot read" in r.stderr


def test_unreachable_agent_exits_2_with_a_hint(agent, tmp_path):
    r = agent.cli("--socket", str(tmp_path / "nope.sock"), "node", "show", socket=False)
    assert r.returncode == 2 and "cannot reach the minicloud agent" in r.stderr


def test_backup_operation_with_progress_and_download(agent, tmp_path):
    target = tmp_path / "state-backup.db"
    r = agent.cli("admin", "backup", str(target), check=True)
    assert "Backed up revision" in r.stdout and "succeeded" in r.stderr
    db = sqlite3.connect(target)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    ops = agent.json("operation", "list", "--state", "succeeded")
    assert any(op["action"] == "admin.backup" for op in ops)


def test_completion_script_is_valid_bash(agent):
    script = agent.cli("completion", "bash", check=True).stdout
    assert "complete -F _minicloud minicloud" in script and "keypair" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_config_validate(agent, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[agent]\nlisten = "127.0.0.1:8443"\n')
    assert agent.cli("config", "validate", "--config", str(good)).stdout.strip() == "configuration is valid"
    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\nlisten = "everywhere"\n')
    r = agent.cli("config", "validate", "--config", str(bad))
    assert r.returncode == 1 and "HOST:PORT" in r.stdout


def test_init_then_remote_over_tls_with_a_pinned_ca(fresh_agent):
    a = fresh_agent
    init = a.json("init")
    assert init["initialised"] and init["secret"].startswith("mc_")
    again = a.cli("init", check=True).stdout
    assert "already initialised" in again
    fp = init["ca_fingerprint"]
    wrong = a.cli("remote", "add", "evil", a.https, "--token", init["secret"], "--fingerprint", "sha256:" + "0" * 64)
    assert wrong.returncode == 1 and "intercepting" in wrong.stderr
    bad_token = a.cli("remote", "add", "lab", a.https, "--token", "mc_x.y", "--fingerprint", fp)
    assert bad_token.returncode == 1 and "refused the token" in bad_token.stderr
    unattended = a.cli("remote", "add", "lab", a.https, "--token", init["secret"])
    assert unattended.returncode == 1 and fp in unattended.stderr
    a.cli("remote", "add", "lab", a.https, "--token", init["secret"], "--fingerprint", fp, check=True)
    a.cli("keypair", "import", "over-socket", "-", input=make_ssh_key(), check=True)
    listed = json.loads(a.cli("--remote", "lab", "-o", "json", "keypair", "list", socket=False, check=True).stdout)
    assert [k["name"] for k in listed] == ["over-socket"]
    assert a.json("remote", "list")[0]["ca_fingerprint"] == fp
    a.cli("remote", "remove", "lab", check=True)
    assert a.json("remote", "list") == []


def test_sigterm_shuts_down_gracefully_and_notifies_systemd(tmp_path):
    from tests.integration.conftest import Agent

    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(30)
    try:
        a = Agent(tmp_path / "n", extra_env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000"}).start()
        messages = [listener.recv(1024).decode()]
        assert messages[0].startswith("READY=1")
        assert a.stop() == 0
        while "STOPPING=1" not in messages[-1]:
            messages.append(listener.recv(1024).decode())
        assert "WATCHDOG=1" in messages
        assert not (a.data_dir / "agent.json").exists()
        lines = [json.loads(line) for line in a.log.read_text().splitlines() if line.startswith("{")]
        assert {"time", "level", "logger", "msg"} <= lines[0].keys()
        assert any(line["msg"] == "stopped" for line in lines)
    finally:
        listener.close()


def test_projects_and_the_audit_log_through_the_cli(agent):
    project = unique("team")
    agent.cli("project", "create", project, "--description", "a team", check=True)
    assert project in [p["name"] for p in agent.json("project", "list")]
    name = unique("kp")
    agent.cli("--project", project, "keypair", "import", name, "-", input=make_ssh_key(), check=True)
    assert name in [k["name"] for k in agent.json("--project", project, "keypair", "list")]
    assert name not in [k["name"] for k in agent.json("keypair", "list")]
    busy = agent.cli("project", "delete", project)
    assert busy.returncode == 1 and "still holds keypairs" in busy.stderr
    entries = agent.json("audit", "list", "--in-project", project, "--since", "1h")
    assert [(e["action"], e["result"], e["principal"]) for e in entries] == [
        ("compute:keypairs:create", "allowed", "local:root")
    ]
    table = agent.cli("audit", "list", "--since", "1h", check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["TIME", "PRINCIPAL", "PROJECT"]


def test_users_roles_and_login_over_tls(fresh_agent):
    a = fresh_agent
    init = a.json("init")
    a.cli("user", "create", "alice", "--password-stdin", input="correct horse battery staple\n", check=True)
    a.cli("role", "grant", "member", "--user", "alice", "--project", "default", check=True)
    assert [b["role"] for b in a.json("role", "bindings", "--user", "alice")] == ["member"]
    a.cli(
        "remote", "add", "lab", a.https, "--token", init["secret"], "--fingerprint", init["ca_fingerprint"], check=True
    )
    r = a.cli("--remote", "lab", "login", "alice", "--password-stdin", input="wrong password entirely\n", socket=False)
    assert r.returncode == 1 and "wrong" in r.stderr
    a.cli(
        "--remote",
        "lab",
        "login",
        "alice",
        "--password-stdin",
        input="correct horse battery staple\n",
        socket=False,
        check=True,
    )
    a.cli("--remote", "lab", "keypair", "import", "alices", "-", input=make_ssh_key(), socket=False, check=True)
    denied = a.cli("--remote", "lab", "user", "list", socket=False)
    assert denied.returncode == 1 and "iam:users:list" in denied.stderr
    audit = a.json("audit", "list", "--user", "user:alice")
    assert {(e["action"], e["result"]) for e in audit} == {
        ("compute:keypairs:create", "allowed"),
        ("iam:users:list", "denied"),
    }
    a.cli("--remote", "lab", "logout", socket=False, check=True)
    gone = a.cli("--remote", "lab", "keypair", "list", socket=False)
    assert gone.returncode == 1
    key = a.json("apikey", "create", "ci-key", "--user", "alice")
    alice = a.json("user", "show", "alice")
    assert key["principal"] == f"user:{alice['id']}" and key["secret"].startswith("mc_")  # by id
