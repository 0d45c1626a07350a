"""``tollway guardrails test --config … "text"``: what a policy would do to a text.

Picks the policy the gateway would pick for ``--tier``/``--tenant``/``--model``
and prints the text as the provider (``--direction input``) or the client
(``output``) would get it, or the refusal, and the verdicts.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from proxy.config.model import Config
from proxy.core.errors import ContentFiltered
from proxy.core.principal import Principal
from proxy.stages.guardrails.config import GuardrailSettings
from proxy.stages.guardrails.scan import Scan


def add_commands(sub: Any) -> None:
    guard = sub.add_parser("guardrails", help="try the guardrail policies").add_subparsers(
        dest="action", required=True
    )
    t = guard.add_parser("test", help="show what a policy does to a text")
    t.add_argument("text")
    t.add_argument("--config", help="YAML config")
    t.add_argument("--model", default="", help="public model name the policy is chosen for")
    t.add_argument("--tier", help="caller's tier")
    t.add_argument("--tenant", help="caller's tenant")
    t.add_argument("--direction", choices=("input", "output"), default="input")


def run(args: argparse.Namespace, config: Config) -> int:
    settings = config.section("guardrails")
    who = None
    if args.tier or args.tenant:
        who = Principal("cli", "cli", 0, args.tenant or "", args.tier or "", None)
    policy = settings.select(who, args.model) if isinstance(settings, GuardrailSettings) else None
    if policy is None:
        print("no guardrail policy applies: the text passes unchanged")
        return 0
    scan = Scan()
    rules = policy.input if args.direction == "input" else policy.output
    try:
        result = scan.apply(args.text, rules, args.direction)
        print(f"policy {policy.name}: {'unchanged' if result == args.text else 'redacted'}")
        print(result)
        code = 0
    except ContentFiltered as exc:
        print(f"policy {policy.name}: blocked (400 content_filter): {exc.message}")
        code = 1
    for verdict in scan.records():
        print(orjson.dumps(verdict).decode())
    return code
