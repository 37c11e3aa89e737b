"""The custom provider (URL, token, request template, JSON paths) against its fake upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from orchestra.budget.v1 import budget_service_pb2 as budget_pb2
from orchestra.budget.v1 import budget_service_pb2_grpc as budget_grpc
from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.config_file import ConfigFileError, CustomMapping, parse_config
from services.providers.base import FailureKind, Finish, TextDelta, UsageReport
from services.providers.custom import CustomAdapter, render
from services.router.engine import Engine, EngineConfig
from tests.fakes.custom_upstream import PATH, FakeCustom
from tests.providers.common import (
    FAULT_CASES,
    FAULT_IDS,
    READ_TIMEOUT,
    TEXT,
    FaultCase,
    collect,
    request,
    text_of,
)
from tests.router.conftest import running_suite

MODEL = "acme-large"
KEY = "acme-test-key-0123456789"

# The mapping an operator writes for the fake's API (also the README example).
MAPPING: dict[str, Any] = {
    "path": PATH,
    "auth_header": "X-Api-Key",
    "auth_prefix": "",
    "models": ["acme-large", "acme-small"],
    "request": {
        "model": "{{model}}",
        "input": "{{messages}}",
        "params": {"max_new_tokens": "{{max_tokens}}", "temperature": "{{temperature}}"},
        "stream": "{{stream}}",
        "tag": "orchestra:{{model}}",
    },
    "response": {
        "text": "output.text",
        "finish_reason": "output.stop_reason",
        "prompt_tokens": "usage.input",
        "completion_tokens": "usage.output",
        "error": "error.message",
    },
    "finish_reasons": {"end": "stop", "max_tokens": "length"},
}
SSE = {
    "format": "sse",
    "text": "delta.text",
    "finish_reason": "done_reason",
    "prompt_tokens": "usage.input",
    "completion_tokens": "usage.output",
    "error": "error.message",
    "done": "[DONE]",
}


def _adapter(fake: FakeCustom, stream: dict[str, Any] | None) -> CustomAdapter:
    mapping = CustomMapping.model_validate({**MAPPING, "stream": stream})
    return CustomAdapter("acme", fake.url, mapping, credential=KEY, read_timeout=READ_TIMEOUT)


@pytest.fixture
async def fake() -> AsyncIterator[FakeCustom]:
    async with FakeCustom(api_key=KEY, chunks=4) as server:
        yield server


@pytest.fixture
async def unary(fake: FakeCustom) -> AsyncIterator[CustomAdapter]:
    adapter = _adapter(fake, None)
    yield adapter
    await adapter.aclose()


@pytest.fixture
async def streaming(fake: FakeCustom) -> AsyncIterator[CustomAdapter]:
    adapter = _adapter(fake, SSE)
    yield adapter
    await adapter.aclose()


async def test_unary_answer_is_read_through_the_paths(
    unary: CustomAdapter, fake: FakeCustom
) -> None:
    events, error = await collect(unary, request(MODEL, temperature=0.5))
    assert error is None
    assert events == [
        TextDelta(TEXT),
        UsageReport(prompt_tokens=events[1].prompt_tokens, completion_tokens=4),  # type: ignore[union-attr]
        Finish(chat_pb2.FINISH_REASON_STOP),
    ]
    (sent,) = fake.requests
    assert sent.path == PATH and sent.headers["X-Api-Key"] == KEY
    assert "authorization" not in sent.headers
    assert sent.body == {
        "model": MODEL,
        "input": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there."},
        ],
        "params": {"max_new_tokens": 64, "temperature": 0.5},
        "stream": False,
        "tag": "orchestra:acme-large",
    }


async def test_an_unset_placeholder_leaves_its_key_out(
    unary: CustomAdapter, fake: FakeCustom
) -> None:
    await collect(unary, request(MODEL))  # no temperature
    body = fake.requests[0].body
    assert body is not None and body["params"] == {"max_new_tokens": 64}


@pytest.mark.parametrize("framing", ["sse", "ndjson"])
async def test_a_stream_is_read_event_by_event(fake: FakeCustom, framing: str) -> None:
    fake.stream_format = framing  # type: ignore[assignment]
    stream = {**SSE, "format": framing, "done": "[DONE]" if framing == "sse" else ""}
    adapter = _adapter(fake, stream)
    events, error = await collect(adapter, request(MODEL))
    await adapter.aclose()
    assert error is None
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == 4 and text_of(events) == TEXT  # passed through piece by piece
    assert Finish(chat_pb2.FINISH_REASON_STOP) in events
    (usage,) = [e for e in events if isinstance(e, UsageReport)]
    assert usage.completion_tokens == 4
    body = fake.requests[0].body
    assert body is not None and body["stream"] is True


async def test_finish_reasons_are_mapped(streaming: CustomAdapter) -> None:
    events, error = await collect(streaming, request(MODEL, max_tokens=2))
    assert error is None and Finish(chat_pb2.FINISH_REASON_LENGTH) in events
    assert text_of(events) != TEXT


async def test_no_usage_means_no_usage_report(fake: FakeCustom, streaming: CustomAdapter) -> None:
    fake.report_usage = False
    events, error = await collect(streaming, request(MODEL))
    assert error is None and text_of(events) == TEXT
    assert not [e for e in events if isinstance(e, UsageReport)]  # the engine estimates


@pytest.mark.parametrize("case", FAULT_CASES, ids=FAULT_IDS)
async def test_faults(streaming: CustomAdapter, fake: FakeCustom, case: FaultCase) -> None:
    fake.set_fault(case.fault, times=1)
    events, error = await collect(streaming, request(MODEL))
    assert error is not None and error.kind is case.kind, error
    assert error.status == case.status
    assert bool(text_of(events)) is case.streamed_first
    if case.fault.retry_after is not None:
        assert error.retry_after == case.fault.retry_after


async def test_the_error_path_names_the_problem(unary: CustomAdapter) -> None:
    _, error = await collect(unary, request("nope"))
    assert error is not None and error.kind is FailureKind.CLIENT_ERROR and error.status == 404
    assert "no model named 'nope'" in str(error)


async def test_a_wrong_token_is_a_client_error(fake: FakeCustom) -> None:
    mapping = CustomMapping.model_validate(MAPPING)
    adapter = CustomAdapter("acme", fake.url, mapping, credential="wrong")
    _, error = await collect(adapter, request(MODEL))
    await adapter.aclose()
    assert error is not None and error.status == 401 and "X-Api-Key" in str(error)


async def test_a_stream_without_its_end_is_broken(fake: FakeCustom) -> None:
    fake.stream_format = "ndjson"
    # The fake's NDJSON stream has no "[DONE]" line: a stream that waits for one is cut short.
    adapter = _adapter(fake, {**SSE, "format": "ndjson", "finish_reason": ""})
    _, error = await collect(adapter, request(MODEL))
    await adapter.aclose()
    assert error is not None and error.kind is FailureKind.STREAM_BROKEN


def test_placeholders_keep_their_json_type() -> None:
    values = {"model": "m", "max_tokens": 5, "stop": ["x"], "stream": False}
    template = {"a": "{{ max_tokens }}", "b": ["{{stop}}", "{{seed}}"], "c": "n={{max_tokens}}"}
    assert render(template, values) == {"a": 5, "b": [["x"]], "c": "n=5"}
    with pytest.raises(ValueError, match="unknown placeholder"):
        render({"a": "{{nope}}"}, values)


@pytest.mark.parametrize(
    ("custom", "message"),
    [
        (None, "needs its `custom` mapping"),
        ({**MAPPING, "response": {"text": "output[.text"}}, "custom.response.text"),
        ({**MAPPING, "stream": {**SSE, "text": "delta[["}}, "custom.stream.text"),
        ({**MAPPING, "models": []}, "custom.models"),
        ({**MAPPING, "finish_reasons": {"end": "done"}}, "custom.finish_reasons.end"),
        ({**MAPPING, "request": {"q": "{{question}}"}}, "custom.request: .*unknown placeholder"),
    ],
    ids=["missing", "bad-path", "bad-stream-path", "no-models", "bad-finish", "bad-placeholder"],
)
def test_config_errors_name_the_field(custom: dict[str, Any] | None, message: str) -> None:
    entry: dict[str, Any] = {"id": "acme", "type": "custom", "base_url": "http://127.0.0.1:1"}
    if custom is not None:
        entry["custom"] = custom
    with pytest.raises(ConfigFileError, match=message.replace("[", r"\[")):
        parse_config(_yaml({"providers": [entry]}))


def _yaml(data: dict[str, Any]) -> str:
    return str(yaml.safe_dump(data))


# -- through the engine: usage estimated when the provider reports none --------------

CONFIG = """
tenants:
  - id: acme
    policy: {{cache_enabled: false}}
    api_keys: [{{id: app, secret: ok_app_0123456789abcdefghijklmn, scopes: [chat, read]}}]
    budgets: [{{level: tenant, window: month, limit_usd: 1}}]
"""


async def test_the_engine_estimates_usage_the_provider_did_not_report(
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    fake: FakeCustom,
    as_caller: Callable[..., list[tuple[str, str]]],
) -> None:
    fake.report_usage = False
    adapter = _adapter(fake, SSE)
    # The model as discovery describes it (discovery lists a custom provider's
    # configured models); priced so that the estimate has a cost.
    model = discovery_pb2.Model(
        name=f"acme/{MODEL}",
        provider_id="acme",
        model_id=MODEL,
        provider_type=discovery_pb2.PROVIDER_TYPE_CUSTOM,
        context_window=8192,
        pricing=discovery_pb2.Pricing(
            input_micro_usd_per_mtok=1_000_000,
            output_micro_usd_per_mtok=2_000_000,
        ),
        price_source=discovery_pb2.PRICE_SOURCE_OVERRIDE,
    )
    async with running_suite(pg_url, redis_url, CONFIG.format(), tmp_path) as (settings, running):
        router = running["router"].service
        engine = Engine(
            EngineConfig(default_max_tokens=64),
            router.peers,  # type: ignore[attr-defined]
            router.outbox,  # type: ignore[attr-defined]
            lambda: [model],
            {"acme": adapter},
        )
        chat = chat_api.ChatRequest(
            messages=[
                chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text="Hi")])
            ],
        )
        identity = identity_pb2.Identity(tenant_id="acme", key_id="app")
        events = [e async for e in engine.stream(identity, chat, None)]
        end = events[-1].end
        assert events[0].start.model == f"acme/{MODEL}"
        assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == TEXT
        assert end.usage.estimated
        assert end.usage.prompt_tokens > 0 and end.usage.completion_tokens > 0
        assert end.cost_micro_usd > 0
        await engine.aclose()
        await router.outbox.drain()  # type: ignore[attr-defined]
        async with grpc.aio.insecure_channel(settings.addrs["budget"]) as channel:
            status = await budget_grpc.BudgetServiceStub(channel).GetBudgetStatus(
                budget_pb2.GetBudgetStatusRequest(
                    subject=budget_pb2.SpendSubject(tenant_id="acme")
                ),
                metadata=as_caller("acme", "read", key_id="app"),
            )
        assert sum(s.spent_micro_usd for s in status.statuses) == end.cost_micro_usd
    await adapter.aclose()
