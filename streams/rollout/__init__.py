"""Rollout: the engine follower (serve the registry's active version) and shadow/canary."""
