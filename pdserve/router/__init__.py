"""The router: an OpenAI-compatible front door over P/D pairs and mixed instances (see DESIGN.md)."""
