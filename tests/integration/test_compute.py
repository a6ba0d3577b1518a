"""Compute end to end on the real host: a real agent, libvirt (TCG), the default bridge network with dnsmasq, and the
test guest from scripts/build-guest-image, driven through the CLI as a user would."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import libvirt
import pytest

from tests.integration.conftest import Agent, wait_until

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 180


def _domains_of(agent: Agent) -> list[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains(0) if str(agent.data_dir) in d.XMLDesc(0)]
    finally:
        conn.close()


def _domain_xml(agent: Agent, instance_id: str) -> str:
    conn = libvirt.open("qemu:///system")
    try:
        return conn.lookupByName(f"mc-{instance_id}").XMLDesc(0)
    finally:
        conn.close()


def _live_vcpus(agent: Agent, instance_id: str) -> int:
    conn = libvirt.open("qemu:///system")
    try:
        return conn.lookupByName(f"mc-{instance_id}").vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def compute_agent(tmp_path_factory, guest_image: Path):
    root = tmp_path_factory.mktemp("compute")
    agent = Agent(root / "node", compute=True)
    # Images are imported from the agent's allowed directory (compute.image_dirs = [root/node]).
    (agent.root / "guest").mkdir(parents=True)
    for f in ("vmlinuz", "initrd.img"):
        shutil.copy(guest_image / f, agent.root / "guest" / f)
    agent.start()
    agent.cli(
        "image", "import", "guest", "--kernel", str(agent.root / "guest/vmlinuz"),
        "--initrd", str(agent.root / "guest/initrd.img"), check=True,
    )  # fmt: skip
    yield agent
    if agent.proc and agent.proc.poll() is None:
        agent.stop()
    agent.teardown_compute()


def _console(agent: Agent, name: str) -> str:
    return agent.cli("instance", "console", name, check=True).stdout


def test_a_guest_boots_is_reachable_and_goes_through_its_lifecycle(compute_agent: Agent):
    a = compute_agent
    inst = a.json("instance", "create", "web", "--image", "guest", "--type", "m1.tiny", "--wait")
    assert inst["status"]["state"] == "running"
    assert inst["status"]["virt_type"] == "qemu"
    wait_until("the guest's ready marker", lambda: "minicloud-guest: ready" in _console(a, "web"), timeout=BOOT_TIMEOUT)
    console = _console(a, "web")
    assert "minicloud-guest: hostname=web" in console  # the NoCloud seed arrived

    def address():
        addrs = a.json("instance", "show", "web")["status"]["addresses"]
        return addrs[0]["ip"] if addrs and addrs[0]["ip"] else None

    ip = wait_until("a DHCP address in status.addresses", address, timeout=BOOT_TIMEOUT)
    assert f"minicloud-guest: ip={ip}" in console or f"minicloud-guest: ip={ip}" in _console(a, "web")
    page = wait_until("the guest's httpd", lambda: _http(f"http://{ip}/"), timeout=60)
    assert "<h1>web</h1>" in page

    # Running: only the vCPUs may change (CPU hot-plug up to the node's CPUs); memory needs a stop.
    a.cli("type", "create", "tiny-2cpu", "--vcpus", "2", "--memory", "128", "--disk", "1", check=True)
    a.cli("type", "create", "tiny-plus", "--vcpus", "2", "--memory", "192", "--disk", "1", check=True)
    refused = a.cli("instance", "resize", "web", "--type", "tiny-plus")
    assert refused.returncode != 0 and "its memory would change" in refused.stderr
    if inst["max_vcpus"] >= 2:
        assert a.json("instance", "resize", "web", "--type", "tiny-2cpu")["vcpus"] == 2
        wait_until("the second vCPU plugged in", lambda: _live_vcpus(a, inst["id"]) == 2, timeout=60)

    stopped = a.json("instance", "stop", "web", "--wait")
    assert stopped["status"]["state"] == "stopped" and stopped["power"] == "stopped"
    assert _domains_of(a) == [f"mc-{inst['id']}"]  # stopped keeps the domain (and its disk)

    resized = a.json("instance", "resize", "web", "--type", "tiny-plus")
    assert (resized["type"], resized["vcpus"], resized["memory_mib"]) == ("tiny-plus", 2, 192)
    started = a.json("instance", "start", "web", "--wait")
    assert started["status"]["state"] == "running"
    xml = _domain_xml(a, inst["id"])
    assert "<memory unit='KiB'>196608</memory>" in xml and ">2</vcpu>" in xml

    boots = _console(a, "web").count("minicloud-guest: init started")
    a.cli("instance", "reboot", "web", "--force", check=True)
    wait_until(
        "a second boot", lambda: _console(a, "web").count("minicloud-guest: init started") > boots, timeout=BOOT_TIMEOUT
    )

    a.cli("instance", "delete", "web", "--wait", check=True)
    assert a.cli("instance", "show", "web").returncode != 0
    assert _domains_of(a) == []
    assert not (a.data_dir / "instances" / inst["id"]).exists()  # overlay, seed, console log: all gone


def _http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.read().decode()
    except OSError:
        return None


def test_bad_requests_are_refused_and_create_nothing(compute_agent: Agent):
    a = compute_agent
    before_images = a.json("image", "list")
    escape = a.root / "escape"  # a symlink inside the allowed directory that points out of it
    escape.unlink(missing_ok=True)
    escape.symlink_to("/etc/passwd")
    cases = [
        (["instance", "create", "x1", "--image", "no-such-image", "--type", "m1.tiny"], "no image 'no-such-image'"),
        (["instance", "create", "x1", "--image", "guest", "--type", "m9.huge"], "no instance type 'm9.huge'"),
        (["instance", "create", "x1", "--image", "guest", "--type", "m1.tiny", "--disk-size", "999999999"], "disk_gib"),
        (
            ["instance", "create", "x1", "--image", "guest", "--type", "m1.tiny", "--disk-size", "60000"],
            "no node has room",
        ),
        (["instance", "create", "bad name!", "--image", "guest", "--type", "m1.tiny"], "invalid value for 'name'"),
        (["image", "import", "etc", "/etc/hostname"], "outside the directories"),
        (
            ["image", "import", "up", "--kernel", str(a.root / "guest" / ".." / ".." / ".." / "etc" / "passwd")],
            "outside",
        ),
        (["image", "import", "link", "--kernel", str(escape)], "outside the directories"),
    ]
    for args, message in cases:
        result = a.cli(*args)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
    corrupt = a.root / "corrupt.qcow2"
    corrupt.write_bytes(b"QFI\xfb" + b"\x00\x00\x00\x03" + b"\xff" * 4096)
    result = a.cli("image", "import", "corrupt", str(corrupt))
    assert result.returncode != 0 and "not a readable disk image" in result.stderr
    text = a.root / "notes.txt"
    text.write_text("hello")
    result = a.cli("image", "import", "notes", str(text), "--format", "qcow2")
    assert result.returncode != 0 and "qemu-img finds raw" in result.stderr
    assert a.json("image", "list") == before_images
    assert not [p for p in (a.data_dir / "images").iterdir() if p.name.startswith(".staging")]
    assert all(i["name"] != "x1" for i in a.json("instance", "list"))
    dup = a.cli("image", "import", "guest", "--kernel", str(a.root / "guest/vmlinuz"))
    assert dup.returncode != 0 and "already exists" in dup.stderr


def test_an_agent_killed_mid_create_and_mid_delete_converges_with_nothing_leaked(compute_agent: Agent):
    a = compute_agent
    # Crash right after the domain is defined and before it is started.
    a.stop()
    a.env["MINICLOUD_FAULT"] = "compute.build.after_define"
    a.start()
    inst = a.json("instance", "create", "crashy", "--image", "guest", "--type", "m1.tiny")
    assert a.proc is not None and a.proc.wait(60) == -9  # SIGKILLed itself at the fault point
    assert _domains_of(a) == [f"mc-{inst['id']}"]  # half done: defined, not running
    del a.env["MINICLOUD_FAULT"]
    a.start()
    running = wait_until(
        "the instance to converge to running",
        lambda: (i := a.json("instance", "show", "crashy"))["status"]["state"] == "running" and i,
        timeout=BOOT_TIMEOUT,
    )
    assert running["status"]["node"]
    assert _domains_of(a) == [f"mc-{inst['id']}"]

    # Crash right after the domain is destroyed and before it is undefined and its files removed.
    a.stop()
    a.env["MINICLOUD_FAULT"] = "compute.teardown.after_destroy"
    a.start()
    a.cli("instance", "delete", "crashy", check=True)
    assert a.proc is not None and a.proc.wait(60) == -9
    assert (a.data_dir / "instances" / inst["id"]).exists()
    del a.env["MINICLOUD_FAULT"]
    a.start()
    wait_until(
        "the instance to be gone", lambda: a.cli("instance", "show", "crashy").returncode != 0, timeout=BOOT_TIMEOUT
    )
    assert _domains_of(a) == []
    assert not (a.data_dir / "instances" / inst["id"]).exists()
