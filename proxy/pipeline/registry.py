"""The stages that plug into the pipeline, in the order their hooks run.

A feature is a ``Stage`` subclass (``proxy.stages.base``) and one line here.
Its YAML section becomes a known top-level key of the config file; a stage
whose section is absent or off is left out of each snapshot's hook lists,
so it costs nothing per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from proxy.config import model
from proxy.config.model import Config, Section
from proxy.stages.base import Stage
from proxy.stages.cache.stage import ResponseCacheStage
from proxy.stages.guardrails.stage import GuardrailsStage
from proxy.stages.semcache.stage import SemanticCacheStage
from proxy.stages.settle.budget_alerts import BudgetAlertsStage
from proxy.stages.settle.events import EventsStage
from proxy.stages.trace.stage import TracingStage

# Order is the order of ``on_request`` (and of every other hook). Input
# checks that may refuse a request (guardrails) go before the cache, so a
# cache hit can never skip them; the caches come last, right before forward:
# the exact one first (cheaper), then the semantic one. BudgetAlertsStage has
# no request hooks (it owns ``budget_alerts:``); nor has TracingStage (it owns
# ``tracing:`` and lends each snapshot its tracer); nor has EventsStage (it
# owns ``events:``, the tenant event log's settings).
STAGES: tuple[type[Stage], ...] = (
    GuardrailsStage,
    ResponseCacheStage,
    SemanticCacheStage,
    BudgetAlertsStage,
    EventsStage,
    TracingStage,
)

SECTIONS: tuple[Section, ...] = tuple(
    Section(cls.section, cls.configure) for cls in STAGES if cls.section is not None
)


def build_stages() -> tuple[Stage, ...]:
    """One instance of each stage for one app (they hold its resources)."""
    return tuple(cls() for cls in STAGES)


def parse_config(text: str, env: Mapping[str, str] | None = None) -> Config:
    """``proxy.config.model.parse_config`` with the stages' sections known."""
    return model.parse_config(text, env, SECTIONS)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    return model.load_config(path, env, SECTIONS)
