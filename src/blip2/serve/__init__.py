"""HTTP serving for BLIP-2 / InstructBLIP checkpoints (`blip2 serve`).

Needs the `serve` extra (fastapi, uvicorn); `import blip2` does not import this package, and importing it
does not import them either: `create_app` / `serve` load them when called.

    from blip2.serve import create_app, ServeSettings
    app = create_app(blip2.load("DIR"), ServeSettings(max_batch_rows=16))
"""

from __future__ import annotations

from .engine import RequestError, ServeSettings

__all__ = ["BackgroundServer", "RequestError", "ServeSettings", "create_app", "serve"]


def __getattr__(name):  # the FastAPI side only when it is used
    if name in ("create_app", "serve", "BackgroundServer"):
        from . import app  # deferred: app.py is where the optional `serve` extra (fastapi, uvicorn) is used

        return getattr(app, name)
    raise AttributeError(f"module 'blip2.serve' has no attribute {name!r}")
