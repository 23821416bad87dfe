"""OpenAI- and Anthropic-compatible HTTP server (`nemotron3 serve`) and the web chat page.

    from nemotron3.engine import LLM
    from nemotron3.server import create_app
    app = create_app(LLM("models/pico"), served_model_name="pico")
"""
from .app import create_app

__all__ = ["create_app"]
