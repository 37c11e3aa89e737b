"""Runs the router service: ``python -m services.router``."""

from services.common.server import main
from services.router.server import build

if __name__ == "__main__":
    main("router", build)
