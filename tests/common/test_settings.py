"""Settings read from the environment: the event loop, service addresses and replicas."""

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


def test_a_service_address_may_list_its_replicas() -> None:
    loaded = settings.load({**BASE, "ORCHESTRA_CACHE_ADDR": "127.0.0.1:50053, 127.0.0.1:50058"})
    assert settings.addresses(loaded.addrs["cache"]) == ["127.0.0.1:50053", "127.0.0.1:50058"]
    assert loaded.listen_addr("cache") == "127.0.0.1:50053"  # the first, unless told
    both = "127.0.0.1:50053,127.0.0.1:50058"
    replica = settings.load({**BASE, "ORCHESTRA_CACHE_ADDR": both, "ORCHESTRA_PORT": "50058"})
    assert replica.listen_addr("cache") == "127.0.0.1:50058"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ORCHESTRA_CACHE_ADDR": "cache-0:1,cache-1:1"}, "a list of replicas takes IP addresses"),
        ({"ORCHESTRA_CACHE_ADDR": "127.0.0.1:1,nope"}, "ORCHESTRA_CACHE_ADDR must be host:port"),
        ({"ORCHESTRA_CACHE_ADDR": " , "}, "ORCHESTRA_CACHE_ADDR must be host:port"),
        ({"ORCHESTRA_PORT": "70000"}, "ORCHESTRA_PORT must be a TCP port"),
    ],
)
def test_bad_addresses_and_ports_are_refused_with_the_variable_named(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(settings.SettingsError, match=message):
        settings.load({**BASE, **env})
