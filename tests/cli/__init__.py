"""Tests of the `orchestra` command line and the embedded runtime (services/cli)."""
