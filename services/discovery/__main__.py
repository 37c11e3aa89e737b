"""Runs the discovery service: ``python -m services.discovery``."""

from services.common.server import main
from services.discovery.server import build

if __name__ == "__main__":
    main("discovery", build)
