"""On the Unix socket the caller is root, unless it presents credentials: then it has exactly their rights."""

from __future__ import annotations

import secrets

from minicloud.client import Client


def test_credentials_on_the_socket_act_as_their_principal(agent):
    name = f"sock-{secrets.token_hex(3)}"
    agent.cli("user", "create", name, check=True)  # no terminal: no password, API keys only
    agent.cli("role", "grant", "viewer", "--user", name, check=True)
    secret = agent.json("apikey", "create", f"{name}-key", "--user", name)["secret"]
    as_user = Client(socket_path=str(agent.socket), token=secret)
    assert as_user.raw("GET", "/v1/keypairs").status == 200  # a viewer may read
    denied = as_user.raw("POST", "/v1/projects", json={"name": f"p-{name}"})
    assert denied.status == 403 and "iam:projects:create" in denied.json()["detail"]
    bogus = Client(socket_path=str(agent.socket), token="mc_nothing.really")
    assert bogus.raw("GET", "/v1/keypairs").status == 401
    root = Client(socket_path=str(agent.socket))
    assert root.raw("POST", "/v1/projects", json={"name": f"p-{name}"}).status == 201
