"""Runs the audit service: ``python -m services.audit``."""

from services.audit.server import build
from services.common.server import main

if __name__ == "__main__":
    main("audit", build)
