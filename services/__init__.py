"""Orchestra's services: router, budget, cache, audit, discovery, and the CLI."""
