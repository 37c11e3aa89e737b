"""The router: the public chat API, routing decisions and provider adapters."""
