"""A real VictoriaMetrics for the metrics tests: one per test session (per xdist worker), started from the same
command line the agent uses (``agent.tsdb.TsdbConfig``) with a small latency offset, and loaded with series of two
projects, and of an earlier project deleted and re-created under pa's name, through ``/api/v1/import/prometheus``."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

import pytest

from agent.tsdb import TsdbConfig, _free_port

#: Series the enforcement tests look for: project ``pa`` has small values, ``pb`` has values no ``pa`` series has.
PA_VALUES = {"1", "2"}
PB_VALUES = {"777", "778"}
#: The projects' ids (enforced) and an earlier project named ``pa``, deleted: its series have other values again.
PA_ID, PB_ID, OLD_PA_ID = "prj-pa", "prj-pb", "prj-pa-old"
OLD_PA_VALUES = {"555"}


@dataclass
class Victoria:
    url: str
    auth: tuple[str, str]
    now: float

    def get(self, path: str, **params: str) -> bytes:
        request = urllib.request.Request(self.url + path + "?" + urllib.parse.urlencode(params))
        token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.read()

    def post(self, path: str, body: bytes) -> None:
        request = urllib.request.Request(self.url + path, data=body, method="POST")
        token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def import_text(self, text: str) -> None:
        """Import Prometheus text lines and make them searchable now (``/internal/force_flush``)."""
        self.post("/api/v1/import/prometheus", text.encode())
        self.get("/internal/force_flush")


def project_series(now: float, pa_id: str = PA_ID, pb_id: str = PB_ID, *, node_and_old: bool = True) -> str:
    """Prometheus text lines of pa and pb (with these project ids) at now-120 s, now-60 s and now; with
    ``node_and_old``, a node series and the deleted earlier pa's series too."""
    lines = []
    for ago in (120, 60, 0):
        ms = int((now - ago) * 1000)
        a, b = f'project_id="{pa_id}",project="pa"', f'project_id="{pb_id}",project="pb"'
        lines += [
            f'minicloud_instance_cpu_seconds_total{{instance_id="i-a1",name="vm1",{a},node="n1"}} 1 {ms}',
            f'minicloud_instance_cpu_seconds_total{{instance_id="i-a2",name="vm2",{a},node="n1"}} 2 {ms}',
            f'minicloud_instance_cpu_seconds_total{{instance_id="i-b1",name="vm1",{b},node="n1"}} 777 {ms}',
            f'minicloud_instance_memory_bytes{{instance_id="i-b1",name="vm1",{b},node="n1"}} 778 {ms}',
        ]
        if node_and_old:
            old = f'project_id="{OLD_PA_ID}",project="pa"'
            lines += [
                f'minicloud_node_load1{{node="n1"}} 5 {ms}',
                f'minicloud_instance_memory_bytes{{instance_id="i-old",name="vm1",{old},node="n1"}} 555 {ms}',
            ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def victoria(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("victoria")
    config = TsdbConfig(data_dir=base / "tsdb", latency_offset=1.0)
    config.scrape_file.write_text("scrape_configs: []\n")
    port = _free_port()
    password = secrets.token_urlsafe(16)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "httpAuth_password": password}
    with open(config.log_file, "ab") as log:
        proc = subprocess.Popen(config.command(port), stdout=log, stderr=log, env=env)
    vm = Victoria(url=f"http://127.0.0.1:{port}", auth=("minicloud", password), now=time.time())
    try:
        deadline = time.monotonic() + 30
        while True:  # start-up: wait until it answers (not a timing assumption of any test)
            try:
                if vm.get("/health").strip() == b"OK":
                    break
            except OSError:
                pass
            assert proc.poll() is None, (base / "tsdb.log").read_text()
            assert time.monotonic() < deadline, "victoria-metrics did not start"
            time.sleep(0.05)
        vm.import_text(project_series(vm.now))
        yield vm
    finally:
        proc.terminate()
        proc.wait(15)
