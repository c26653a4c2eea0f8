"""The OpenAI-compatible API server (its own process; the engine core runs in another)."""
