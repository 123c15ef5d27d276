"""The OpenAI-compatible HTTP server (``peftkit serve``); see ``docs/serving.md``."""

from peftkit.serving.http.app import create_app

__all__ = ["create_app"]
