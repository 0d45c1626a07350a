"""Tollway: an OpenAI-compatible reverse proxy for LLM traffic."""

__version__ = "0.1.0"
