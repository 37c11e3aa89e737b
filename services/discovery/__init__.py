"""The discovery service: providers, the model catalog, health, WatchModels."""
