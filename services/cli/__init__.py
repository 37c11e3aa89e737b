"""The `orchestra` command line and the embedded runtime it starts."""
