"""OpenTelemetry for gRPC, off unless ORCHESTRA_OTEL says otherwise.

``console`` prints spans to stderr (for a look at what happens); ``otlp``
exports to the collector named by the standard OTEL_EXPORTER_OTLP_* variables
and needs ``opentelemetry-exporter-otlp`` installed.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)
_enabled = False


def setup(service_name: str, mode: str) -> None:
    """Installs a tracer provider and instruments gRPC clients and servers."""
    global _enabled
    if not mode or _enabled:
        return
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if mode == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    resource = Resource.create({"service.name": f"orchestra-{service_name}"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorClient().instrument()  # type: ignore[no-untyped-call]
    _enabled = True
    log.info("OpenTelemetry tracing on (%s)", mode)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The OpenTelemetry server interceptor when tracing is on, else none."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]
