"""The exceptions of the embedded runtime: one base class, one subclass per failure."""

from __future__ import annotations


class EmbeddedError(RuntimeError):
    """Base class for failures of the embedded runtime."""


class ChildFailed(EmbeddedError):
    """A child could not be started, exited while starting or never got ready."""


class StopRequested(EmbeddedError):
    """SIGINT or SIGTERM arrived while the supervisor was starting a child."""


class LocalModelUnavailable(EmbeddedError):
    """llama-cpp-python or the packaged SmolLM2 model is not installed."""
