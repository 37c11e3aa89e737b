"""Process settings, read once at start from the environment and the config file.

Precedence: environment variable > the ``server:`` section of the YAML file
named by ``ORCHESTRA_CONFIG`` > default. Settings are frozen; a bad value fails
at start with a message naming the variable.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from services.common.config_file import OrchestraFile, load_config_file

# Default ports of the suite's parts (docs/architecture.md lists them).
DEFAULT_ADDRS: Mapping[str, str] = {
    "router": "127.0.0.1:50051",
    "budget": "127.0.0.1:50052",
    "cache": "127.0.0.1:50053",
    "audit": "127.0.0.1:50054",
    "discovery": "127.0.0.1:50055",
}
SERVICES = tuple(DEFAULT_ADDRS)

# uvloop (libuv) spends less CPU per chat than asyncio's own loop in every
# figure of bench/overhead.py (docs/performance.md); it is not built for Windows.
DEFAULT_EVENT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a service process needs to know at start.

    Attributes:
        internal_key: HMAC key for edge-signed identities (ORCHESTRA_INTERNAL_KEY).
        database_url: PostgreSQL URL (DATABASE_URL).
        redis_url: Redis URL (REDIS_URL).
        addrs: Where every service listens (ORCHESTRA_<SERVICE>_ADDR): one
            host:port, or a comma-separated list of IP:port, one per replica,
            which callers balance over (round robin, skipping a replica whose
            health check is not SERVING).
        listen_host: Interface services bind to (ORCHESTRA_LISTEN_HOST).
        port: The port this process binds (ORCHESTRA_PORT; None: the port of
            the first address of its own service's entry).
        config: The parsed declarative config file (empty when none given).
        config_path: Where it came from (ORCHESTRA_CONFIG).
        otel: "" (off), "console" or "otlp" (ORCHESTRA_OTEL).
        grace_seconds: Time calls in flight get to finish when the service
            stops (ORCHESTRA_GRACE_SECONDS).
        drain_seconds: On SIGTERM, how long the service keeps serving while
            NOT_SERVING moves traffic elsewhere (ORCHESTRA_DRAIN_SECONDS).
        log_level: Python logging level name (ORCHESTRA_LOG_LEVEL).
        event_loop: "uvloop" or "asyncio": the event loop a service process
            runs on (ORCHESTRA_EVENT_LOOP; uvloop wherever it is installed).
    """

    internal_key: bytes
    database_url: str
    redis_url: str
    addrs: Mapping[str, str]
    listen_host: str
    config: OrchestraFile
    config_path: Path | None
    otel: str
    grace_seconds: float
    drain_seconds: float
    log_level: str
    event_loop: str = "asyncio"
    port: int | None = None

    def listen_addr(self, service: str) -> str:
        """The address ``service`` binds to: its port on ``listen_host``."""
        port = self.port or int(addresses(self.addrs[service])[0].rsplit(":", 1)[1])
        return f"{self.listen_host}:{port}"


def addresses(value: str) -> list[str]:
    """The host:port entries of an ORCHESTRA_<SERVICE>_ADDR value."""
    return [a.strip() for a in value.split(",") if a.strip()]


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Reads the settings.

    Args:
        env: The environment (defaults to ``os.environ``).

    Raises:
        SettingsError: A required variable is missing or a value is malformed.
        ConfigFileError: The config file does not validate.
    """
    env = os.environ if env is None else env
    config_path = Path(env["ORCHESTRA_CONFIG"]) if env.get("ORCHESTRA_CONFIG") else None
    config = load_config_file(config_path) if config_path else OrchestraFile()
    server = config.server

    def pick(var: str, from_file: str | None, default: str = "") -> str:
        return env.get(var) or from_file or default

    key = pick("ORCHESTRA_INTERNAL_KEY", server.internal_key)
    if len(key) < 16:
        raise SettingsError(
            "ORCHESTRA_INTERNAL_KEY must be set to a secret of at least 16 characters "
            "(`orchestra up` generates one in its state directory)"
        )
    addrs = {
        name: pick(f"ORCHESTRA_{name.upper()}_ADDR", server.addrs.get(name), default)
        for name, default in DEFAULT_ADDRS.items()
    }
    for name, addr in addrs.items():
        var = f"ORCHESTRA_{name.upper()}_ADDR"
        entries = addresses(addr)
        for entry in entries:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit():
                raise SettingsError(f"{var} must be host:port (or a list of them), got {addr!r}")
            if len(entries) > 1 and not _is_ip(host):
                raise SettingsError(
                    f"{var}: a list of replicas takes IP addresses, got {host!r}"
                    " (for a DNS name with several addresses, give the name alone)"
                )
        if not entries:
            raise SettingsError(f"{var} must be host:port, got {addr!r}")
    port_text = pick("ORCHESTRA_PORT", None)
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise SettingsError(f"ORCHESTRA_PORT must be a TCP port, got {port_text!r}")
    otel = pick("ORCHESTRA_OTEL", server.otel).lower()
    if otel not in ("", "off", "console", "otlp"):
        raise SettingsError(f"ORCHESTRA_OTEL must be off, console or otlp, got {otel!r}")
    loop = pick("ORCHESTRA_EVENT_LOOP", None, DEFAULT_EVENT_LOOP).lower()
    if loop not in ("uvloop", "asyncio"):
        raise SettingsError(f"ORCHESTRA_EVENT_LOOP must be uvloop or asyncio, got {loop!r}")
    if loop == "uvloop" and DEFAULT_EVENT_LOOP != "uvloop":
        raise SettingsError("ORCHESTRA_EVENT_LOOP=uvloop, but uvloop is not installed")
    grace = _seconds(pick("ORCHESTRA_GRACE_SECONDS", None, "5"), "ORCHESTRA_GRACE_SECONDS")
    # Envoy takes a replica out after two failed health checks 2 s apart.
    drain = _seconds(pick("ORCHESTRA_DRAIN_SECONDS", None, "5"), "ORCHESTRA_DRAIN_SECONDS")
    return Settings(
        internal_key=key.encode(),
        database_url=pick("DATABASE_URL", server.database_url),
        redis_url=pick("REDIS_URL", server.redis_url),
        addrs=addrs,
        listen_host=pick("ORCHESTRA_LISTEN_HOST", server.listen_host, "127.0.0.1"),
        config=config,
        config_path=config_path,
        otel="" if otel == "off" else otel,
        grace_seconds=grace,
        drain_seconds=drain,
        log_level=pick("ORCHESTRA_LOG_LEVEL", None, "INFO").upper(),
        event_loop=loop,
        port=int(port_text) if port_text else None,
    )


def _seconds(value: str, name: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, got {value!r}") from None
    if not seconds >= 0:
        raise SettingsError(f"{name} must not be negative, got {value!r}")
    return seconds


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def require(value: str, var: str, service: str) -> str:
    """Returns ``value`` or fails naming the variable ``service`` needs."""
    if not value:
        raise SettingsError(f"the {service} service needs {var}")
    return value
