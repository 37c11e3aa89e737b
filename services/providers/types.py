"""The provider types: one enum for the contract's values and the config file's names.

:class:`ProviderType` mirrors ``orchestra.discovery.v1.ProviderType`` value for
value (discovery stores and answers those values); its members' lower-case
names are the config file's ``type`` strings
(:data:`services.common.config_file.ProviderTypeName`).
"""

from __future__ import annotations

import enum
from typing import TypeGuard, get_args

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.common.config_file import ProviderTypeName

_CONFIG_NAMES = frozenset(get_args(ProviderTypeName))


def _configurable(name: str) -> TypeGuard[ProviderTypeName]:
    return name in _CONFIG_NAMES


class ProviderType(enum.IntEnum):
    """A provider's wire format (``orchestra.discovery.v1.ProviderType``)."""

    UNSPECIFIED = pb.PROVIDER_TYPE_UNSPECIFIED
    OPENAI = pb.PROVIDER_TYPE_OPENAI
    ANTHROPIC = pb.PROVIDER_TYPE_ANTHROPIC
    GEMINI = pb.PROVIDER_TYPE_GEMINI
    OLLAMA = pb.PROVIDER_TYPE_OLLAMA
    VLLM = pb.PROVIDER_TYPE_VLLM
    LM_STUDIO = pb.PROVIDER_TYPE_LM_STUDIO
    OPENAI_COMPATIBLE = pb.PROVIDER_TYPE_OPENAI_COMPATIBLE
    CUSTOM = pb.PROVIDER_TYPE_CUSTOM

    @classmethod
    def from_config(cls, name: str) -> ProviderType:
        """The type a config file names (``"openai"``, ``"lm_studio"`` …).

        Raises:
            ValueError: Not a type the config file knows.
        """
        if not _configurable(name):
            raise ValueError(f"unknown provider type {name!r}")
        return cls[name.upper()]

    @property
    def config_name(self) -> ProviderTypeName:
        """The config file's name for it.

        Raises:
            ValueError: UNSPECIFIED, which the config file cannot name.
        """
        name = self.name.lower()
        if not _configurable(name):
            raise ValueError(f"PROVIDER_TYPE_{self.name} has no config file name")
        return name

    @property
    def proto(self) -> pb.ProviderType.ValueType:
        """The contract's value."""
        return pb.ProviderType.ValueType(self.value)

    @property
    def speaks_openai(self) -> bool:
        """Whether it speaks the OpenAI chat-completions format."""
        return self in OPENAI_WIRE


# Provider types that speak the OpenAI chat-completions format.
OPENAI_WIRE = frozenset(
    {
        ProviderType.OPENAI,
        ProviderType.VLLM,
        ProviderType.LM_STUDIO,
        ProviderType.OPENAI_COMPATIBLE,
    }
)
