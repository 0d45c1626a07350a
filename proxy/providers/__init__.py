"""Provider adapters, one module per wire format, built by ``kind``."""

from __future__ import annotations

from proxy.config.model import ProviderConfig
from proxy.providers.anthropic import AnthropicProvider
from proxy.providers.base import Call, Provider, Reply, UpstreamStream
from proxy.providers.echo import EchoProvider
from proxy.providers.gemini import GeminiProvider
from proxy.providers.openai import AzureProvider, OpenAIProvider
from proxy.providers.pool import Pool

__all__ = ["Call", "Provider", "Reply", "UpstreamStream", "build_provider"]


def build_provider(cfg: ProviderConfig, client: Pool) -> Provider:
    if cfg.kind == "echo":
        return EchoProvider(cfg)
    if cfg.kind == "openai":
        return OpenAIProvider(cfg, client)
    if cfg.kind == "azure":
        return AzureProvider(cfg, client)
    if cfg.kind == "anthropic":
        return AnthropicProvider(cfg, client)
    if cfg.kind == "gemini":
        return GeminiProvider(cfg, client)
    raise NotImplementedError(f"provider kind {cfg.kind!r} is not built yet")
