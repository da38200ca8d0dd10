"""Serving the trained guard with Ray Serve (routes, batching, the vLLM replicas)."""
