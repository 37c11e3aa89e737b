"""Runs the cache service: ``python -m services.cache``."""

from services.cache.server import build
from services.common.server import main

if __name__ == "__main__":
    main("cache", build)
