"""The whole suite as a user runs it: ``orchestra up``, then calls through Envoy.

One ``orchestra up`` (a real subprocess, free ports, a temporary state dir,
the packaged local model on one thread, two replicas of the router and of the
cache) serves every test in this module.
Calls go through the edge with generated stubs, grpcurl and the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestra.audit.v1 import audit_service_pb2 as audit_pb2
from orchestra.audit.v1 import audit_service_pb2_grpc as audit_grpc
from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import chat_service_pb2_grpc as chat_grpc
from services.cli.embedded import free_port
from services.common import errors

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# A shared CPU makes the tiny model slow; these bound the wait, not the speed.
CHAT_DEADLINE = 240.0
START_DEADLINE = 300.0


class Suite:
    """A running ``orchestra up``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.edge_port = free_port()
        self.service_base = free_port()
        while any(_in_use(self.service_base + i) for i in range(10)):  # two port blocks
            self.service_base = free_port()
        command = [
            str(BIN / "orchestra"), "up",
            "--state-dir", str(state_dir),
            "--edge-port", str(self.edge_port),
            "--admin-port", str(free_port()),
            "--service-port-base", str(self.service_base),
            "--model-port", str(free_port()),
            "--redis-port", str(free_port()),
            "--model-threads", "1",
            "--replicas", "router=2,cache=2",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        self.log = (state_dir.parent / "up.log").open("w+")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_DEADLINE
        while "Orchestra is up" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"orchestra up did not start:\n{self.output()}")
            time.sleep(0.5)
        self.api_key = (state_dir / "api-key").read_text().strip()
        self.edge = f"127.0.0.1:{self.edge_port}"

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def _in_use(port: int) -> bool:
    return any(c.laddr and c.laddr.port == port for c in psutil.net_connections("tcp"))


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    running = Suite(tmp_path_factory.mktemp("suite") / "state")
    children = psutil.Process(running.process.pid).children(recursive=True)
    yield running
    running.stop()
    assert running.process.returncode == 0, running.output()
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {[p.info for p in alive]}"


@pytest.fixture
def channel(suite: Suite) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(suite.edge) as ch:
        yield ch


def _user(text: str) -> chat_pb2.Message:
    return chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])


def test_grpcurl_lists_every_service_through_the_edge(suite: Suite) -> None:
    listed = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", suite.edge, "list"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()  # fmt: skip
    for name in (
        "orchestra.router.v1.ChatService",
        "orchestra.router.v1.RouterService",
        "orchestra.budget.v1.AccountService",
        "orchestra.budget.v1.BudgetService",
        "orchestra.cache.v1.CacheService",
        "orchestra.audit.v1.AuditService",
        "orchestra.discovery.v1.DiscoveryService",
        "grpc.health.v1.Health",
    ):
        assert name in listed


def test_every_service_reports_serving(suite: Suite) -> None:
    suite_file = json.loads((suite.state_dir / "suite.json").read_text())
    for name, addr in suite_file["services"].items():
        with grpc.insecure_channel(addr) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    status = subprocess.run(
        [str(BIN / "orchestra"), "status", "--state-dir", str(suite.state_dir)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr


def test_chat_stream_delivers_chunks_from_the_local_model(
    suite: Suite, channel: grpc.Channel
) -> None:
    stub = chat_grpc.ChatServiceStub(channel)
    request = chat_api.ChatRequest(
        messages=[_user("Name three colours.")],
        generation=chat_pb2.GenerationConfig(max_tokens=24, temperature=0.0),
        cache=chat_api.CacheControl(mode=chat_api.CACHE_MODE_DISABLED),
    )
    events = list(stub.ChatStream(request, metadata=suite.auth(), timeout=CHAT_DEADLINE))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert events[0].start.model == "local/smollm2"
    deltas = [e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta"]
    assert len(deltas) >= 3, "the answer should arrive in several chunks"
    assert "".join(deltas).strip()
    end = events[-1].end
    assert end.finish_reason in (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)
    assert end.usage.completion_tokens > 0 and end.usage.prompt_tokens > 0
    assert end.cost_micro_usd == 0  # a local model is free by declaration


def test_a_repeated_chat_is_answered_from_the_cache_and_audited(
    suite: Suite, channel: grpc.Channel
) -> None:
    stub = chat_grpc.ChatServiceStub(channel)
    request = chat_api.ChatRequest(
        messages=[_user("Say OK.")],
        generation=chat_pb2.GenerationConfig(max_tokens=8, temperature=0.0),
    )
    first = stub.Chat(request, metadata=suite.auth(), timeout=CHAT_DEADLINE)
    assert not first.cache_hit
    deadline = time.monotonic() + 30  # the store happens off the request path
    # Every miss stores its own answer (the tiny model is not always
    # deterministic), so the hit replays one of the answers the misses got.
    answers = {first.message.content[0].text}
    second = stub.Chat(request, metadata=suite.auth(), timeout=CHAT_DEADLINE)
    while not second.cache_hit and time.monotonic() < deadline:
        answers.add(second.message.content[0].text)
        time.sleep(0.2)
        second = stub.Chat(request, metadata=suite.auth(), timeout=CHAT_DEADLINE)
    assert second.cache_hit
    assert second.message.content[0].text in answers
    audit = audit_grpc.AuditServiceStub(channel)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        records = audit.ListRecords(
            audit_pb2.ListRecordsRequest(kind=audit_pb2.RECORD_KIND_CHAT, page_size=1000),
            metadata=suite.auth(), timeout=10,
        ).records  # fmt: skip
        ids = {r.chat.request_id for r in records}
        if {first.request_id, second.request_id} <= ids:
            break
        time.sleep(0.2)
    assert {first.request_id, second.request_id} <= ids


def test_a_paraphrase_hits_the_cache_a_renumbered_or_negated_question_does_not(
    suite: Suite, channel: grpc.Channel
) -> None:
    stub = chat_grpc.ChatServiceStub(channel)

    def ask(text: str) -> chat_api.ChatResponse:
        request = chat_api.ChatRequest(
            messages=[_user(text)],
            generation=chat_pb2.GenerationConfig(max_tokens=8, temperature=0.0),
        )
        return stub.Chat(request, metadata=suite.auth(), timeout=CHAT_DEADLINE)

    question = "How can I improve my English speaking in 30 days?"
    ask(question)
    deadline = time.monotonic() + 30  # the store happens off the request path
    cached = ask(question)
    while not cached.cache_hit and time.monotonic() < deadline:
        time.sleep(0.2)  # a miss meanwhile stores its own answer: compare with the hit's
        cached = ask(question)
    assert cached.cache_hit

    paraphrase = ask("What is the best way to improve my English speaking in 30 days?")
    renumbered = ask("How can I improve my English speaking in 60 days?")
    negated = ask("How can I not improve my English speaking in 30 days?")

    assert paraphrase.cache_hit, paraphrase.routing_reason
    assert paraphrase.routing_reason == "cache hit (semantic)"
    assert paraphrase.message.content[0].text == cached.message.content[0].text
    assert not renumbered.cache_hit
    assert not negated.cache_hit


def test_grpcurl_streams_a_chat_through_the_edge(suite: Suite) -> None:
    body = json.dumps({
        "messages": [{"role": "ROLE_USER", "content": [{"text": "Hi"}]}],
        "generation": {"maxTokens": 8},
    })  # fmt: skip
    result = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-max-time", str(int(CHAT_DEADLINE)),
         "-H", f"authorization: Bearer {suite.api_key}", "-d", body,
         suite.edge, "orchestra.router.v1.ChatService/ChatStream"],
        capture_output=True, text=True, timeout=CHAT_DEADLINE + 10,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"start"' in result.stdout and '"end"' in result.stdout


def test_orchestra_chat_models_and_budget_commands(suite: Suite) -> None:
    base = ["--state-dir", str(suite.state_dir), "--edge", suite.edge]
    chat = subprocess.run(
        [str(BIN / "orchestra"), "chat", "hello", "--max-tokens", "8", *base],
        capture_output=True, text=True, timeout=CHAT_DEADLINE,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    assert "local/smollm2" in chat.stderr and "tokens" in chat.stderr
    models = subprocess.run(
        [str(BIN / "orchestra"), "models", *base], capture_output=True, text=True, timeout=30
    )
    assert models.returncode == 0, models.stderr
    assert "local/smollm2" in models.stdout
    budget = subprocess.run(
        [str(BIN / "orchestra"), "budget", *base], capture_output=True, text=True, timeout=30
    )
    assert budget.returncode == 0, budget.stderr
    header, *rows = budget.stdout.strip().splitlines()
    assert header.split()[:3] == ["LEVEL", "SUBJECT", "WINDOW"]
    # The packaged config's one budget: tenant "default", monthly, $100, hard.
    assert rows[0].split()[:5] == ["tenant", "default", "month", "hard", "$100.0000"]


def _status(call: object) -> errors.ErrorDetails:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return errors.decode(exc)
    raise AssertionError("the call succeeded")


@pytest.mark.parametrize(
    ("request_", "auth", "code", "reason"),
    [
        (chat_api.ChatRequest(), "good", grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_MESSAGES"),
        (
            chat_api.ChatRequest(model="nobody/nothing", messages=[_user("hi")]),
            "good", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND",
        ),
        (
            chat_api.ChatRequest(messages=[_user("x" * 1_100_000)]),
            "good", grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_LARGE",
        ),
        (chat_api.ChatRequest(messages=[_user("hi")]), "none",
         grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING"),
        (chat_api.ChatRequest(messages=[_user("hi")]), "wrong",
         grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID"),
    ],
    ids=["empty", "unknown-model", "oversized", "no-key", "wrong-key"],
)  # fmt: skip
def test_bad_requests_get_precise_statuses(
    suite: Suite,
    channel: grpc.Channel,
    request_: chat_api.ChatRequest,
    auth: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    metadata = {
        "good": suite.auth(),
        "none": (),
        "wrong": (("authorization", "Bearer ok_dev_not-the-right-secret-at-all"),),
    }[auth]
    stub = chat_grpc.ChatServiceStub(channel)
    details = _status(lambda: list(stub.ChatStream(request_, metadata=metadata, timeout=30)))
    assert (details.code, details.reason) == (code, reason), details


def test_a_killed_service_is_started_again_and_chat_goes_on(
    suite: Suite, channel: grpc.Channel
) -> None:
    # Last in the module: it takes services down for the tests after it.
    def row(name: str) -> dict[str, object]:
        recorded = json.loads((suite.state_dir / "processes.json").read_text())
        return next(p for p in recorded["processes"] if p["name"] == name)

    def cache_row() -> dict[str, object]:
        return row("cache")

    stub = chat_grpc.ChatServiceStub(channel)
    # One router replica gone: Envoy sends every new chat to the other (a
    # refused connection is retried there), so no client sees a failure.
    os.kill(int(str(row("router-2")["pid"])), signal.SIGKILL)
    for i in range(6):
        request = chat_api.ChatRequest(
            messages=[_user(f"Count to {i}.")],
            generation=chat_pb2.GenerationConfig(max_tokens=4, temperature=0.0),
        )
        events = list(stub.ChatStream(request, metadata=suite.auth(), timeout=CHAT_DEADLINE))
        assert events[-1].WhichOneof("event") == "end", events[-1]

    killed = int(str(cache_row()["pid"]))
    os.kill(killed, signal.SIGKILL)
    request = chat_api.ChatRequest(
        messages=[_user("Say yes, once.")],
        generation=chat_pb2.GenerationConfig(max_tokens=8, temperature=0.0),
    )
    # Chat does not need the cache: while it is down (or starting) a lookup is a miss.
    first = stub.Chat(request, metadata=suite.auth(), timeout=CHAT_DEADLINE)
    assert not first.cache_hit and first.message.content[0].text
    deadline = time.monotonic() + 90
    while not (cache_row()["state"] == "running" and cache_row()["pid"] != killed):
        assert time.monotonic() < deadline, cache_row()
        time.sleep(0.2)
    assert cache_row()["restarts"] == 1
    assert suite.process.poll() is None, "up must keep running"
    status = subprocess.run(
        [str(BIN / "orchestra"), "status", "--state-dir", str(suite.state_dir)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert "killed by SIGKILL" in status.stdout
    # The restarted cache serves again (the answers stored through the outbox,
    # retried while it was down, are in Redis): the same request becomes a hit.
    second = stub.Chat(request, metadata=suite.auth(), timeout=CHAT_DEADLINE)
    while not second.cache_hit and time.monotonic() < deadline:
        time.sleep(0.5)
        second = stub.Chat(request, metadata=suite.auth(), timeout=CHAT_DEADLINE)
    assert second.cache_hit
