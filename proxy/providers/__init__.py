"""Provider adapters, one module per wire format, built by ``kind``."""

from __future__ import annotations

import aiohttp

from proxy.config.model import ProviderConfig
from proxy.providers.anthropic import AnthropicProvider
from proxy.providers.base import Call, Provider, Reply, UpstreamStream
from proxy.providers.echo import EchoProvider
from proxy.providers.gemini import GeminiProvider
from proxy.providers.openai import AzureProvider, OpenAIProvider

__all__ = ["Call", "Provider", "Reply", "UpstreamStream", "build_provider"]


def build_provider(cfg: ProviderConfig, session: aiohttp.ClientSession) -> Provider:
    if cfg.kind == "echo":
        return EchoProvider(cfg)
    if cfg.kind == "openai":
        return OpenAIProvider(cfg, session)
    if cfg.kind == "azure":
        return AzureProvider(cfg, session)
    if cfg.kind == "anthropic":
        return AnthropicProvider(cfg, session)
    if cfg.kind == "gemini":
        return GeminiProvider(cfg, session)
    raise NotImplementedError(f"provider kind {cfg.kind!r} is not built yet")
