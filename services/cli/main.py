"""The ``orchestra`` command.

    orchestra up        start the whole suite on this machine
    orchestra chat      stream an answer through the edge
    orchestra models    list the models discovery knows
    orchestra budget    budget status of the API key's tenant (spent, held, remaining)
    orchestra status    health of every component
    orchestra serve     run one service (containers)
    orchestra edge      render the Envoy configuration and run Envoy (containers)
    orchestra local-model  serve the packaged model over the OpenAI API (containers)
    orchestra audit     verify, export or erase in the audit log, or print its public key

``orchestra COMMAND --help`` describes each.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import runpy
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.config_file import ConfigFileError
from services.common.settings import SERVICES, SettingsError

if TYPE_CHECKING:  # generic in typeshed only, not at run time
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _state_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("ORCHESTRA_STATE_DIR") or ".orchestra")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestra",
        description="Orchestra: a self-hosted LLM gateway of gRPC services behind Envoy.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir",
        help="where `up` keeps all state (default: $ORCHESTRA_STATE_DIR or ./.orchestra)",
    )
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--edge", default=os.environ.get("ORCHESTRA_EDGE", "127.0.0.1:8080"),
        help="the edge address (default: $ORCHESTRA_EDGE or 127.0.0.1:8080)",
    )  # fmt: skip
    client.add_argument(
        "--api-key",
        help="API key (default: $ORCHESTRA_API_KEY, else the key `up` made in the state dir)",
    )
    # The order of the calls is the order of the commands in --help.
    _add_up(sub, state)
    _add_client_commands(sub, state, client)
    _add_container_commands(sub)
    _add_audit(sub, state, client)
    return parser


def _add_up(sub: _Subparsers, state: argparse.ArgumentParser) -> None:
    """``up``: the whole suite on this machine."""
    p = sub.add_parser(
        "up",
        parents=[state],
        help="start PostgreSQL, Redis, the local model, the five services and Envoy",
        description="Start the whole suite on this machine; Ctrl-C or SIGTERM stops it. "
        "A part that exits is started again (backoff 0.5 s doubling to 30 s) while the rest "
        "keeps serving; `orchestra status` shows restarts and last exits. "
        "DATABASE_URL / REDIS_URL use external servers instead of the embedded ones.",
    )
    p.add_argument("--config", type=Path, help="declarative config file (default: packaged)")
    p.add_argument("--edge-port", type=int, default=8080, help="edge port (default 8080)")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (default 9901)")
    p.add_argument(
        "--service-port-base", type=int, default=50051,
        help="router, budget, cache, audit, discovery listen here and on the next 4 ports",
    )  # fmt: skip
    p.add_argument("--model-port", type=int, default=8090, help="local model port (default 8090)")
    p.add_argument("--redis-port", type=int, default=6390, help="embedded Redis port (6390)")
    p.add_argument("--no-local-model", action="store_true", help="do not start the local model")
    p.add_argument(
        "--model-threads", type=int, default=2,
        help="CPU threads for the local model (use 1 on a shared CPU)",
    )  # fmt: skip
    p.add_argument(
        "--replicas", type=_replicas, default={}, metavar="SERVICE=N,...",
        help="processes per service, e.g. router=2,cache=2 (default 1 each); replica k of a "
        "service listens 5*k ports above the first, and Envoy and the services balance over "
        "them",
    )  # fmt: skip


def _replicas(text: str) -> dict[str, int]:
    from services.cli.up import parse_replicas

    try:
        return parse_replicas(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_client_commands(
    sub: _Subparsers, state: argparse.ArgumentParser, client: argparse.ArgumentParser
) -> None:
    """``chat``, ``models``, ``status`` and ``budget``: calls to a running suite."""
    p = sub.add_parser("chat", parents=[state, client], help="stream an answer through the edge")
    p.add_argument("prompt", help="what to ask")
    p.add_argument("--model", default="", help='pin a model ("provider/model"); default: routed')
    p.add_argument("--system", default="", help="a system prompt")
    p.add_argument("--max-tokens", type=int, help="cap on the answer's tokens")

    sub.add_parser("models", parents=[state, client], help="list models, prices and health")
    sub.add_parser("status", parents=[state], help="health of every component of `up`")
    p = sub.add_parser(
        "budget",
        parents=[state, client],
        help="budget status: limit, spent, held, remaining and projection of each budget",
        description="Shows every budget that applies to the API key's tenant (or to the team,"
        " project, key or end user given) in its current window. Needs a key with SCOPE_READ.",
    )
    p.add_argument("--team", default="", help="include this team's budgets")
    p.add_argument("--project", default="", help="include this project's budgets")
    p.add_argument("--key-id", default="", help="include this API key's budgets")
    p.add_argument("--end-user", default="", help="include this end user's budgets")


def _add_container_commands(sub: _Subparsers) -> None:
    """``serve``, ``edge`` and ``local-model``: one component each, for containers."""
    p = sub.add_parser(
        "serve", help="run one service in the foreground (configured by environment)"
    )
    p.add_argument("service", choices=SERVICES)

    p = sub.add_parser(
        "edge",
        help="render the Envoy config from ORCHESTRA_<SERVICE>_ADDR and run Envoy",
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/orchestra-envoy.yaml"))
    p.add_argument("--edge-host", default="0.0.0.0", help="listener address (default 0.0.0.0)")
    p.add_argument("--edge-port", type=int, default=8080)
    p.add_argument("--admin-port", type=int, default=9901)

    p = sub.add_parser(
        "local-model",
        help="serve the packaged SmolLM2 model with llama.cpp's OpenAI-compatible server",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8090, help="port (default 8090)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")


def _add_audit(
    sub: _Subparsers, state: argparse.ArgumentParser, client: argparse.ArgumentParser
) -> None:
    """``audit verify|export|public-key|erase``."""
    p = sub.add_parser("audit", help="verify, export, erase in, or show the key of the audit log")
    audit = p.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    v = audit.add_parser(
        "verify",
        help="recompute the log and check every signed checkpoint; names the first bad index",
    )
    v.add_argument("--database-url", help="PostgreSQL (default: $DATABASE_URL)")
    v.add_argument("--end", type=int, help="verify only the first END records")
    v.add_argument("--export", type=Path, help="verify this JSONL export offline instead")
    v.add_argument("--public-key", help="base64 raw Ed25519 public key, or a file holding it")
    e = audit.add_parser("export", help="write the log and its checkpoints as JSONL")
    e.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    e.add_argument("--database-url", help="PostgreSQL (default: $DATABASE_URL)")
    e.add_argument("--end", type=int, help="export only the first END records")
    audit.add_parser("public-key", help="print the checkpoint public key and key_id")
    x = audit.add_parser(
        "erase",
        parents=[state, client],
        help="erase an end user's stored chat bodies (destroys their key; the log still verifies)",
        description="Destroys the subject key of TENANT + USER through the edge (needs an ADMIN"
        " or OPERATOR key): their encrypted prompt and answer bodies can never be read again,"
        " every record and checkpoint still verifies, and the erasure is itself audited.",
    )
    x.add_argument("--user", required=True, help="the end user (Attribution.end_user)")
    x.add_argument("--tenant", default="", help="the tenant (default: the API key's own)")
    x.add_argument("--reason", default="", help="why, kept in the audit record (e.g. a ticket)")


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("ORCHESTRA_LOG_LEVEL", "WARNING").upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    from services.cli import client, embedded, up

    try:
        if args.command == "up":
            ports = up.Ports(
                edge=args.edge_port,
                admin=args.admin_port,
                services=args.service_port_base,
                model=args.model_port,
                redis=args.redis_port,
            )
            reason = asyncio.run(
                up.run(
                    _state_dir(args.state_dir),
                    config=args.config,
                    ports=ports,
                    local_model=not args.no_local_model,
                    model_threads=args.model_threads,
                    replicas=args.replicas,
                )
            )
            print(f"Orchestra stopped ({reason}).")
            return 0 if reason in ("SIGINT", "SIGTERM") else 1
        if args.command == "chat":
            key = client.api_key(args.api_key, _state_dir(args.state_dir))
            asyncio.run(
                client.chat(
                    args.edge, key, args.prompt,
                    model=args.model, system=args.system, max_tokens=args.max_tokens,
                )
            )  # fmt: skip
            return 0
        if args.command == "models":
            key = client.api_key(args.api_key, _state_dir(args.state_dir))
            asyncio.run(client.models(args.edge, key))
            return 0
        if args.command == "status":
            return 0 if asyncio.run(client.status(_state_dir(args.state_dir))) else 1
        if args.command == "budget":
            from orchestra.budget.v1 import budget_service_pb2 as budget_pb2

            key = client.api_key(args.api_key, _state_dir(args.state_dir))
            subject = budget_pb2.SpendSubject(
                team=args.team, project=args.project, key_id=args.key_id, end_user=args.end_user
            )
            asyncio.run(client.budget_status(args.edge, key, subject))
            return 0
        if args.command == "serve":
            sys.argv = [f"services.{args.service}"]
            runpy.run_module(f"services.{args.service}", run_name="__main__", alter_sys=True)
            return 0
        if args.command == "edge":
            return _edge(args)
        if args.command == "audit":
            from services.cli import audit_cmd

            run = {
                "verify": audit_cmd.run_verify,
                "export": audit_cmd.run_export,
                "public-key": audit_cmd.run_public_key,
                "erase": audit_cmd.run_erase,
            }[args.audit_command]
            return run(args)
        if args.command == "local-model":
            command = embedded.local_model_command(args.port, args.threads, host=args.host)
            os.execv(command[0], command)
    except (client.CliError, embedded.EmbeddedError, ConfigFileError, SettingsError) as exc:
        print(f"orchestra {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def _edge(args: argparse.Namespace) -> int:
    from services.cli import edge
    from services.common.settings import DEFAULT_ADDRS, addresses

    addrs = {}
    for name in SERVICES:
        value = os.environ.get(f"ORCHESTRA_{name.upper()}_ADDR", DEFAULT_ADDRS[name])
        replicas = []
        for entry in addresses(value):
            host, _, port = entry.rpartition(":")
            replicas.append((host.strip("[]"), int(port)))
        addrs[name] = replicas
    config = edge.render_envoy_config(
        args.out, edge_host=args.edge_host, edge_port=args.edge_port,
        admin_host="0.0.0.0", admin_port=args.admin_port, **addrs,  # type: ignore[arg-type]
    )  # fmt: skip
    command = edge.envoy_command(config)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
