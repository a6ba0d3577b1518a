"""``agent.storage.rgw._run`` (how radosgw and radosgw-admin are run): stdout, or RgwError saying why."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from agent.storage.rgw import RgwError, _run


async def test_stdout_is_returned_and_a_failure_says_stderr():
    assert await _run([sys.executable, "-c", "print('{}')"], timeout=10) == "{}\n"
    with pytest.raises(RgwError, match=r"failed \(exit 3\): no user info saved"):
        await _run(
            [sys.executable, "-c", "import sys; sys.stderr.write('no user info saved'); sys.exit(3)"], timeout=10
        )


async def test_a_missing_program_names_its_package_and_a_slow_one_is_killed(tmp_path):
    with pytest.raises(RgwError, match=r"not installed.*Debian package radosgw"):
        await _run(["radosgw-admin-not-here"], timeout=10)
    with pytest.raises(RgwError, match="did not finish"):
        await _run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)


async def test_a_cancelled_run_kills_its_process(tmp_path):
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    task = asyncio.create_task(_run([sys.executable, "-c", code], timeout=60))
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
