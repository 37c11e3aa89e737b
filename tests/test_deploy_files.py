"""The files a user deploys from: compose.yaml, the example configs, the CLI help."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.cli.main import _parser
from services.common.config_file import ConfigFileError, load_config_file, parse_config
from services.common.settings import DEFAULT_ADDRS, SERVICES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, object]:
    loaded = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_compose_names_every_service_and_store(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict)
    assert set(services) == {*SERVICES, "postgres", "redis", "local-model", "edge"}
    for name in SERVICES:
        assert services[name]["command"] == ["serve", name]


def test_compose_ports_and_addresses_match_the_code(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict)
    env = services["router"]["environment"]
    for name, default in DEFAULT_ADDRS.items():
        port = default.rsplit(":", 1)[1]
        assert env[f"ORCHESTRA_{name.upper()}_ADDR"] == f"{name}:{port}"
        assert services[name]["expose"] == [port]
    assert services["edge"]["ports"] == ["8080:8080"]
    assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["DATABASE_URL"]
    assert env["REDIS_URL"].startswith("redis://redis:")
    # Every service reads the same environment (the YAML anchor), config mounted.
    for name in SERVICES:
        assert services[name]["environment"] == env
        assert "./examples/orchestra.yaml:/config/orchestra.yaml:ro" in services[name]["volumes"]


def test_the_dockerfile_builds_what_compose_runs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ENTRYPOINT \[\"orchestra\"\]", dockerfile, re.M)
    for copied in ("gen", "services", "deploy"):
        assert f"COPY {copied} {copied}" in dockerfile


@pytest.mark.parametrize("path", ["examples/orchestra.yaml", "services/cli/default.yaml"])
def test_shipped_configs_validate(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRA_DEV_KEY", "ok_dev_" + "x" * 24)
    monkeypatch.setenv("ORCHESTRA_LOCAL_MODEL_URL", "http://127.0.0.1:8090/v1")
    config = load_config_file(ROOT / path)
    assert config.providers and config.tenants


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("providers: [{id: x, type: openai, base_url: ftp://a}]", "providers[0].base_url"),
        ("providers: [{id: x, type: nonsense, base_url: http://a}]", "providers[0].type"),
        ("tenants: [{id: Bad_Id}]", "tenants[0].id"),
        ("tenants: [{id: a, api_keys: [{id: k, secret: short}]}]", "tenants[0].api_keys[0].secret"),
        ("tenants: [{id: a, budgets: [{limit_usd: 0}]}]", "tenants[0].budgets[0].limit_usd"),
        ("routing: {default_max_tokens: -1}", "routing.default_max_tokens"),
        ("unknown_section: 1", "unknown_section"),
        ("- just a list", "top level must be a mapping"),
        ("a: [unclosed", "not valid YAML"),
    ],
)
def test_config_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigFileError, match=re.escape(message)):
        parse_config(text)


def test_every_cli_command_documents_itself() -> None:
    parser = _parser()
    commands = next(
        action.choices
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    assert set(commands) >= {"up", "chat", "models", "status", "serve", "edge", "local-model"}
    for name in commands:
        result = subprocess.run(
            [sys.executable, "-m", "services.cli.main", name, "--help"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "usage: orchestra" in result.stdout


def test_chat_without_any_api_key_says_how_to_get_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "chat", "hi", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "no API key" in result.stderr and "orchestra up" in result.stderr
