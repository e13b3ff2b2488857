"""The OpenAI-compatible HTTP API of the scheduler: app.py (FastAPI routes, server) and schema.py (pydantic models,
and their translation to the gRPC API's requests)."""
