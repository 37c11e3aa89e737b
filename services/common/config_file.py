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
from typing import Any, Literal

import jmespath
import yaml
from jmespath.exceptions import JMESPathError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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


def _jmespath(value: str) -> str:
    if value:
        try:
            jmespath.compile(value)
        except JMESPathError as exc:
            raise ValueError(f"not a JMESPath expression: {exc}") from None
    return value


FinishName = Literal["stop", "length", "tool_calls", "content_filter", "error"]
# What a custom provider's request template may use, as "{{name}}".
CUSTOM_PLACEHOLDERS = frozenset(
    {
        "model",
        "messages",
        "prompt",
        "system",
        "last_user",
        "stream",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
    }
)
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")


def _placeholders(node: object) -> None:
    if isinstance(node, dict):
        for item in node.values():
            _placeholders(item)
    elif isinstance(node, list):
        for item in node:
            _placeholders(item)
    elif isinstance(node, str):
        for name in PLACEHOLDER.findall(node):
            if name not in CUSTOM_PLACEHOLDERS:
                known = ", ".join(sorted(CUSTOM_PLACEHOLDERS))
                raise ValueError(f"unknown placeholder {{{{{name}}}}}; known: {known}")


class CustomAnswer(_Strict):
    """Where a ``custom`` provider's JSON answer (or stream event) keeps each piece.

    Each field is a JMESPath expression (https://jmespath.org), e.g.
    ``choices[0].message.content``; empty means the provider does not say.
    """

    text: str
    finish_reason: str = ""
    prompt_tokens: str = ""
    completion_tokens: str = ""
    error: str = ""

    _paths = field_validator(
        "text", "finish_reason", "prompt_tokens", "completion_tokens", "error"
    )(_jmespath)


class CustomStream(CustomAnswer):
    """How a ``custom`` provider streams: the framing, and paths into each event."""

    format: Literal["sse", "ndjson"]
    done: str = ""  # the SSE data that ends the stream, e.g. "[DONE]"


class CustomMapping(_Strict):
    """How to speak to a ``custom`` provider: a request template and JSON paths.

    In ``request``, a string that is exactly a placeholder (``"{{max_tokens}}"``)
    becomes the value with its JSON type; a key whose placeholder has no value
    (an unset temperature) is left out. Placeholders: model, messages (a list
    of ``{role, content}``), prompt (the conversation as text), system,
    last_user, max_tokens, temperature, top_p, stop, seed, stream.
    """

    path: str = ""  # POSTed to base_url + path
    auth_header: str = "Authorization"  # the credential goes in this header …
    auth_prefix: str = "Bearer "  # … after this prefix
    models: list[str] = Field(min_length=1)  # the models it serves (it has no listing)
    request: dict[str, Any]
    response: CustomAnswer
    stream: CustomStream | None = None  # without it: one JSON answer per request
    finish_reasons: dict[str, FinishName] = Field(default_factory=dict)

    @field_validator("request")
    @classmethod
    def _template(cls, value: dict[str, Any]) -> dict[str, Any]:
        _placeholders(value)
        return value


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
    # The request/response mapping of a ``custom`` provider (required for that type).
    custom: CustomMapping | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _custom(self) -> ProviderEntry:
        if self.type == "custom" and self.custom is None:
            raise ValueError("a custom provider needs its `custom` mapping")
        if self.type != "custom" and self.custom is not None:
            raise ValueError("`custom` is only for providers of type custom")
        return self


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


class PriceOverride(_Strict):
    """An operator's price for a model, replacing the packaged catalog's.

    ``model`` is a full name ("openai/gpt-4o-mini": that provider's model) or a
    bare model id ("gpt-4o-mini": that model at every provider); a full name
    wins over a bare id.
    """

    model: str = Field(min_length=1)
    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(ge=0)
    cached_input_usd_per_mtok: float = Field(default=0.0, ge=0)


class OrchestraFile(_Strict):
    """The whole file."""

    server: ServerSection = Field(default_factory=ServerSection)
    providers: list[ProviderEntry] = Field(default_factory=list)
    tenants: list[TenantEntry] = Field(default_factory=list)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    # Operator prices (negotiated rates, self-hosted costs), over the catalog's.
    prices: list[PriceOverride] = Field(default_factory=list)


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
