"""The command line's interface, through the real parser (nothing is executed)."""

from __future__ import annotations

import os

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
