"""The response cache service: exact and semantic layers over durable Redis entries.

See :mod:`services.cache.keys` for what makes two requests the same,
:mod:`services.cache.policy` for which answers are stored,
:mod:`services.cache.keyspace` for the Redis layout,
:mod:`services.cache.semantic` for near matches and
:mod:`services.cache.verifier` for when a near match may be served.
"""
