"""HTTP helpers shared by the API server and the router: OpenAI-style errors and the API-key check.

It knows FastAPI and the error shape only; nothing of engines, models, routing or torch.
"""
