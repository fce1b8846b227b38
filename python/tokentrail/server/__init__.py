"""An OpenAI-compatible HTTP server with continuous batching (``tokentrail serve``).

    from tokentrail.server import create_app, serve
    app = create_app(tokentrail.load("SmolLM2-135M-Instruct"), parallel=8)   # a FastAPI app
    serve(model, port=8000)                                                   # or run it with uvicorn

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client).
"""
from .app import create_app, serve
from .scheduler import Scheduler, forward_step

__all__ = ["create_app", "serve", "Scheduler", "forward_step"]
