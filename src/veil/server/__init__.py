"""The HTTP server: `create_app` (FastAPI), the model service behind it, and a threaded runner."""
