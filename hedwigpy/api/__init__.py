"""The HTTP side of the daemon: the admin API (health, readiness, queue) as a quart-trio app served
by hypercorn in the root nursery."""

from .app import create_app
from .server import serve_http

__all__ = ["create_app", "serve_http"]
