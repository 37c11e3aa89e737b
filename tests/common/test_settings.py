"""Settings read from the environment: the event loop choice."""

from __future__ import annotations

import pytest

from services.common import settings

BASE = {"ORCHESTRA_INTERNAL_KEY": "0123456789abcdef0123"}


def test_the_services_run_on_uvloop_where_it_is_installed() -> None:
    assert settings.DEFAULT_EVENT_LOOP == "uvloop"  # a dependency on every platform CI runs
    assert settings.load(BASE).event_loop == "uvloop"


def test_asyncio_can_be_chosen() -> None:
    assert settings.load({**BASE, "ORCHESTRA_EVENT_LOOP": "AsyncIO"}).event_loop == "asyncio"


def test_an_unknown_event_loop_is_refused_with_the_variable_named() -> None:
    with pytest.raises(
        settings.SettingsError, match="ORCHESTRA_EVENT_LOOP must be uvloop or asyncio"
    ):
        settings.load({**BASE, "ORCHESTRA_EVENT_LOOP": "trio"})
