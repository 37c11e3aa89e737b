"""Runs the budget service: ``python -m services.budget``."""

from services.budget.server import build
from services.common.server import main

if __name__ == "__main__":
    main("budget", build)
