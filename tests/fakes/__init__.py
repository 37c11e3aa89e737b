"""Fake provider upstreams that speak each provider's real wire format, with faults."""
