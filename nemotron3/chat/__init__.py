"""Chat formatting for Nemotron 3: the Jinja2 chat template and a renderer."""

from .template import CHAT_TEMPLATE, render_chat

__all__ = ["CHAT_TEMPLATE", "render_chat"]
