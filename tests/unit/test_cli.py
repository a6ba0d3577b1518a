"""The command line's interface, through the real parser (nothing is executed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minicloud.cli.agent import agent_overrides, run_agent
from minicloud.cli.main import build_parser


@pytest.mark.parametrize(
    "argv",
    [
        ["agent", "--socket", "/tmp/mc/agent.sock", "--data-dir", "/tmp/mc"],
        ["--socket", "/tmp/mc/agent.sock", "agent", "--data-dir", "/tmp/mc"],
    ],
    ids=["after-agent", "before-agent"],
)
def test_agent_socket_is_accepted_before_and_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.func is run_agent
    overrides = agent_overrides(args)
    assert overrides["agent.socket"] == "/tmp/mc/agent.sock"
    assert overrides["agent.data_dir"] == "/tmp/mc"


def test_agent_socket_is_made_absolute_and_left_to_the_config_when_absent() -> None:
    args = build_parser().parse_args(["agent", "--socket", "rel.sock"])
    assert agent_overrides(args)["agent.socket"] == os.path.abspath("rel.sock")
    assert agent_overrides(build_parser().parse_args(["agent"]))["agent.socket"] is None


# What `pip install minicloud` (no [agent] extra) must be enough for: the modules of the agent extra are blocked.
AGENT_ONLY = ["libvirt", "pyroute2", "pynvml", "psutil", "aiohttp", "aiosqlite", "cryptography"]
BLOCK = f"import sys\nfor name in {AGENT_ONLY!r}:\n    sys.modules[name] = None\n"


def _run_without_agent_extra(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_cli_and_sdk_import_nothing_from_the_agent_extra() -> None:
    done = _run_without_agent_extra(
        """
        import contextlib, io
        import minicloud.client, minicloud.client.compute, minicloud.model
        from minicloud.cli.main import build_parser, main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit as exc:
                assert exc.code == 0, exc.code
        assert "minicloud" in out.getvalue()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "agent" or m.startswith("minicloud.api"))
        assert not loaded, loaded
        """
    )
    assert done.returncode == 0, done.stderr


def test_agent_without_the_agent_extra_says_what_to_install(tmp_path: Path) -> None:
    done = _run_without_agent_extra(
        f"""
        from minicloud.cli.main import main
        sys.exit(main(["agent", "--data-dir", {str(tmp_path)!r}, "--socket", {str(tmp_path / "s")!r}]))
        """
    )
    assert done.returncode == 1, done.stderr
    assert "pip install 'minicloud[agent]'" in done.stderr
    assert "Traceback" not in done.stderr
