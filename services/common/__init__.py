"""Plumbing shared by every Orchestra service: errors, identity, server
bootstrap, configuration, stores and clients. Written once, used everywhere."""
