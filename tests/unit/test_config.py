"""Configuration layering and validation (what `minicloud config validate` reports)."""

from __future__ import annotations

import pytest

from minicloud import config
from minicloud.errors import ConfigError


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    cfg = config.load(env={})
    assert cfg.agent.socket == "/run/minicloud/minicloud.sock"
    assert cfg.agent.data_dir == "/var/lib/minicloud"
    assert cfg.listen_address() == ("0.0.0.0", 8443)


def test_layering_file_then_environment_then_flags(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[agent]\ndata_dir = "/srv/a"\nlisten = "127.0.0.1:9000"\nlog_level = "debug"\n')
    cfg = config.load(f, env={"MINICLOUD_LISTEN": "127.0.0.1:9001", "MINICLOUD_DATA_DIR": "/srv/b"})
    assert (cfg.agent.data_dir, cfg.agent.listen, cfg.agent.log_level) == ("/srv/b", "127.0.0.1:9001", "debug")
    cfg = config.load(f, env={"MINICLOUD_LISTEN": "127.0.0.1:9001"}, overrides={"agent.listen": "[::1]:0"})
    assert cfg.listen_address() == ("::1", 0)


def test_config_file_from_the_environment(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[agent]\nnode_name = "n7"\n')
    assert config.load(env={"MINICLOUD_CONFIG": str(f)}).node_name == "n7"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[agent]\nlisten = 'nowhere'\n", "HOST:PORT"),
        ("[agent]\nlisten = '1.2.3.4:70000'\n", "HOST:PORT"),
        ("[agent]\ndata_dir = 'relative/dir'\n", "absolute"),
        ("[agent]\nlog_level = 'loud'\n", "agent.log_level"),
        ("[agent]\ndata_dri = '/x'\n", "data_dri"),
        ("[api]\nmax_body_bytes = 10\n", "api.max_body_bytes"),
        ("[agent\n", "not valid TOML"),
    ],
)
def test_invalid_configuration_names_the_key(tmp_path, text, needle):
    f = tmp_path / "m.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        config.load(f, env={})
    assert needle in exc.value.detail


def test_an_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml", env={})


def test_a_missing_config_file_is_a_clear_error_not_a_traceback(capsys, tmp_path):
    from minicloud.cli.main import main

    assert main(["config", "show", "--config", str(tmp_path / "missing.toml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: config file") and "Traceback" not in err
