"""The declarative configuration file: providers, tenants, keys, budgets, routing.

One YAML file (``examples/orchestra.yaml`` is annotated) is loaded at start by
every service, each applying its own section: discovery the providers, budget
the tenants, keys and budgets, the router the routing defaults. ``${VAR}`` in a
string is replaced by that environment variable. Validation errors name the
bad field, e.g. ``tenants[0].budgets[1].limit_usd: must be greater than 0``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_ID = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigFileError(ValueError):
    """The config file is unreadable or invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Strict):
    """Process settings (each may be overridden by its environment variable)."""

    internal_key: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    listen_host: str | None = None
    addrs: dict[str, str] = Field(default_factory=dict)
    otel: str | None = None


ProviderTypeName = Literal[
    "openai", "anthropic", "gemini", "ollama", "vllm", "lm_studio", "openai_compatible", "custom"
]


class ProviderEntry(_Strict):
    """An upstream provider."""

    id: str = Field(pattern=_ID)
    type: ProviderTypeName
    base_url: str
    display_name: str = ""
    credential: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    organization: str = ""
    # A local server (llama.cpp, Ollama …): its models cost nothing.
    local: bool = False
    enabled: bool = True
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    read_timeout_seconds: float = Field(default=60.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


ScopeName = Literal["chat", "read", "admin", "operator"]


class ApiKeyEntry(_Strict):
    """An API key whose secret the operator chooses (for bootstrapping)."""

    id: str = Field(pattern=_ID)
    secret: str = Field(min_length=20)
    display_name: str = ""
    team: str = ""
    project: str = ""
    scopes: list[ScopeName] = Field(default_factory=lambda: list[ScopeName](["chat", "read"]))


class BudgetEntry(_Strict):
    """A spending limit."""

    level: Literal["tenant", "team", "project", "api_key", "end_user"] = "tenant"
    subject: str = ""
    window: Literal["day", "month", "request", "total"] = "month"
    limit_usd: float = Field(gt=0)
    soft: bool = False
    alert_thresholds_percent: list[int] = Field(default_factory=list)
    alert_webhook_url: str = ""


class PolicyEntry(_Strict):
    """A tenant's policy."""

    allowed_models: list[str] = Field(default_factory=list)
    routing_strategy: Literal["cost", "latency", "quality", "balanced"] = "balanced"
    cache_enabled: bool = True
    cache_ttl_seconds: int = Field(default=86400, ge=0)
    retention_days: int = Field(default=0, ge=0)
    time_zone: str = "UTC"
    fail_open: bool = False
    requests_per_minute: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)


class TenantEntry(_Strict):
    """A tenant with its policy, keys and budgets."""

    id: str = Field(pattern=_ID)
    display_name: str = ""
    policy: PolicyEntry = Field(default_factory=PolicyEntry)
    api_keys: list[ApiKeyEntry] = Field(default_factory=list)
    budgets: list[BudgetEntry] = Field(default_factory=list)


class RoutingSection(_Strict):
    """Router defaults."""

    default_model: str = ""
    default_max_tokens: int = Field(default=512, gt=0)
    max_request_bytes: int = Field(default=1_048_576, gt=0)


class OrchestraFile(_Strict):
    """The whole file."""

    server: ServerSection = Field(default_factory=ServerSection)
    providers: list[ProviderEntry] = Field(default_factory=list)
    tenants: list[TenantEntry] = Field(default_factory=list)
    routing: RoutingSection = Field(default_factory=RoutingSection)


def _expand(node: object) -> object:
    if isinstance(node, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), node)
    if isinstance(node, list):
        return [_expand(item) for item in node]
    if isinstance(node, dict):
        return {key: _expand(value) for key, value in node.items()}
    return node


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_config(text: str, source: str = "<config>") -> OrchestraFile:
    """Parses and validates a config document.

    Raises:
        ConfigFileError: Naming the file and every bad field.
    """
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{source}: the top level must be a mapping")
    # A section holding only comments parses as null: treat it as absent.
    raw = {key: value for key, value in raw.items() if value is not None}
    try:
        return OrchestraFile.model_validate(_expand(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"{_location(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise ConfigFileError(f"{source}: {problems}") from None


def load_config_file(path: Path) -> OrchestraFile:
    """Reads and validates the config file at ``path``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, str(path))
