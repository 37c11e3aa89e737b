"""The response cache service: an exact layer over durable Redis entries.

See :mod:`services.cache.keys` for what makes two requests the same,
:mod:`services.cache.policy` for which answers are stored, and
:mod:`services.cache.store` for the Redis layout.
"""
