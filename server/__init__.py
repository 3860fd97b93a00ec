"""Conveyor's OpenAI-compatible HTTP server (Starlette + uvicorn)."""
