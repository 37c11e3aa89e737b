"""``ProviderType`` mirrors the contract's enum and names the config file's types."""

from __future__ import annotations

from typing import get_args

import pytest

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.common.config_file import ProviderTypeName
from services.providers.types import OPENAI_WIRE, ProviderType


def test_values_mirror_the_contract() -> None:
    assert {f"PROVIDER_TYPE_{t.name}": t.value for t in ProviderType} == dict(
        pb.ProviderType.items()
    )
    assert all(t.proto == t.value for t in ProviderType)


def test_config_names_are_the_config_files_types() -> None:
    configurable = [t for t in ProviderType if t is not ProviderType.UNSPECIFIED]
    assert {t.config_name for t in configurable} == set(get_args(ProviderTypeName))
    assert all(ProviderType.from_config(t.config_name) is t for t in configurable)


def test_unspecified_and_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="no config file name"):
        _ = ProviderType.UNSPECIFIED.config_name
    for name in ("unspecified", "OPENAI", "azure"):
        with pytest.raises(ValueError, match="unknown provider type"):
            ProviderType.from_config(name)


def test_openai_wire() -> None:
    assert {t.config_name for t in OPENAI_WIRE} == {
        "openai",
        "vllm",
        "lm_studio",
        "openai_compatible",
    }
    assert all(t.speaks_openai == (t in OPENAI_WIRE) for t in ProviderType)
