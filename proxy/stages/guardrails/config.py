"""The YAML ``guardrails:`` section: which checks apply to whom, and what they do.

::

    guardrails:
      policies:                    # the first policy whose ``when`` matches applies
        - name: demo
          when: {tiers: [pro], tenants: ["acme*"], models: ["gpt-*"]}  # globs; absent: any
          restore: true            # put redacted values back into the answer
          detectors:
            - {use: pii, input: redact}                     # a group: pii | secrets
            - {use: secrets, input: redact, output: redact}
            - {use: email, output: log}                     # or one detector by name
            - name: demo-terms                              # a blocklist
              blocklist: {terms: [zorblax], regexes: ["forbidden\\\\s+word"], file: terms.txt}
              input: block
              output: block
            - name: moderation                              # a moderation model
              moderation: {model: omni-moderation-latest, mode: parallel, fail: closed}
              input: block                                  # see ``moderation``
              output: block                                 # the answer too

Actions per direction (``input``: the prompt, ``output``: the answer):
``block``, ``redact``, ``log``, ``off`` (the default). A blocklist file has
one term per line; ``re:`` starts a regex, ``#`` a comment; a relative path
is relative to the working directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from proxy.config.reader import ConfigError, Glob, Node, compile_glob
from proxy.core.principal import Principal
from proxy.stages.guardrails import blocklist, moderation
from proxy.stages.guardrails.detectors import BUILTIN, GROUPS
from proxy.stages.guardrails.view import DIGIT, RUNS, Span, View

ACTIONS = ("block", "redact", "log", "off")
_TOP = ("enabled", "policies")
_POLICY = ("name", "when", "restore", "detectors")
_WHEN = ("tiers", "tenants", "models")
_ENTRY = ("use", "blocklist", "moderation", "name", "input", "output")
_LIST = ("terms", "regexes", "file")


class Finder(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def category(self) -> str: ...
    @property
    def label(self) -> str: ...
    def find(self, text: str, view: View | None = None) -> Any: ...  # Iterator[Span]


@dataclass(frozen=True, slots=True)
class Rule:
    """One detector of one policy entry, with its action in one direction."""

    guardrail: str  # the entry's name: what errors, metrics and usage rows say
    finder: Finder
    action: str


# A group's gate: a substring every match holds ("": none; view.DIGIT,
# view.RUNS: digits), then, when every member has hints, those hints (a
# match holds one of them): ``-`` in prose is common, ``sk-`` or ``tw-`` rare.
Gate = tuple[str, tuple[str, ...]]


class Rules(tuple[Rule, ...]):
    """One direction's rules, grouped by their detectors' ``gate`` once at
    load, so a text without ``@`` or ``-`` (or without any of the group's
    key prefixes) skips whole groups without a call per detector."""

    groups: tuple[tuple[Gate, tuple[tuple[int, Rule], ...]], ...]

    def __new__(cls, rules: Iterable[Rule]) -> Rules:
        self = super().__new__(cls, tuple(rules))
        self.groups = gate_groups(self)
        return self


def gate_groups(rules: tuple[Rule, ...]) -> tuple[tuple[Gate, tuple[tuple[int, Rule], ...]], ...]:
    by_gate: dict[str, list[tuple[int, Rule]]] = {}
    for i, rule in enumerate(rules):
        by_gate.setdefault(getattr(rule.finder, "gate", ""), []).append((i, rule))
    out = []
    for gate, members in by_gate.items():
        hints = [getattr(rule.finder, "hints", ()) for _, rule in members]
        needles: tuple[str, ...] = ()
        if gate not in ("", DIGIT, RUNS) and all(hints):
            needles = tuple(dict.fromkeys(h for group in hints for h in group))
            if needles == (gate,):
                needles = ()
        out.append(((gate, needles), tuple(members)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    tiers: tuple[Glob, ...]
    tenants: tuple[Glob, ...]
    models: tuple[Glob, ...]
    restore: bool
    input: Rules
    output: Rules
    hold_back: int  # characters a stream keeps back so a split match is still whole
    moderation: moderation.ModerationCheck | None = None  # at most one per policy

    def applies(self, who: Principal | None, model: str) -> bool:
        return (
            _any(self.tiers, who.tier if who else None)
            and _any(self.tenants, who.tenant if who else None)
            and _any(self.models, model)
        )


def _any(globs: tuple[Glob, ...], value: str | None) -> bool:
    if not globs:
        return True
    return value is not None and any(g(value) for g in globs)


@dataclass(frozen=True, slots=True)
class GuardrailSettings:
    policies: tuple[Policy, ...]

    def select(self, who: Principal | None, model: str) -> Policy | None:
        return next((p for p in self.policies if p.applies(who, model)), None)


def parse_guardrails(raw: Any) -> GuardrailSettings | None:
    if raw is None:
        return None
    top = Node(raw, "guardrails").mapping(_TOP)
    if "enabled" in top and not top["enabled"].boolean():
        return None
    if "policies" not in top:
        raise ConfigError("guardrails.policies: missing (a list of policies)")
    policies = tuple(_policy(node) for node in top["policies"].items())
    names = [p.name for p in policies]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"guardrails.policies[{i}].name: duplicate policy {name!r}")
    return GuardrailSettings(policies) if policies else None


def _globs(node: Node) -> tuple[Glob, ...]:
    return tuple(compile_glob(item.string()) for item in node.items())


def _policy(node: Node) -> Policy:
    m = node.mapping(_POLICY)
    name = m["name"].string() if "name" in m else node.path.rsplit(".", 1)[-1]
    when = m["when"].mapping(_WHEN) if "when" in m else {}
    if "detectors" not in m:
        raise node.fail("detectors: missing (a list of detectors and their actions)")
    checks = [_moderation(n) for n in m["detectors"].items() if _is_moderation(n)]
    if len(checks) > 1:
        raise m["detectors"].fail("at most one moderation check per policy")
    entries = [_entry(n) for n in m["detectors"].items() if not _is_moderation(n)]
    rules_in = Rules(r for rules, _ in entries for r in rules if r.action != "off")
    rules_out = Rules(r for _, rules in entries for r in rules if r.action != "off")
    longest = max((getattr(r.finder, "longest", 0) for r in rules_out), default=0)
    return Policy(
        name=name,
        tiers=_globs(when["tiers"]) if "tiers" in when else (),
        tenants=_globs(when["tenants"]) if "tenants" in when else (),
        models=_globs(when["models"]) if "models" in when else (),
        restore=m["restore"].boolean() if "restore" in m else False,
        input=rules_in,
        output=rules_out,
        hold_back=max(128, 2 * longest),
        moderation=checks[0] if checks else None,
    )


def _is_moderation(node: Node) -> bool:
    return isinstance(node.value, dict) and "moderation" in node.value


def _moderation(node: Node) -> moderation.ModerationCheck:
    m = node.mapping(_ENTRY)
    if "use" in m or "blocklist" in m:
        raise node.fail("give exactly one of 'use', 'blocklist' or 'moderation'")
    name = m["name"].string() if "name" in m else "moderation"
    return moderation.parse(node, name, m)


def _action(m: dict[str, Node], key: str) -> str:
    if key not in m:
        return "off"
    value = m[key].value
    if value not in ACTIONS:
        raise m[key].fail(f"must be one of: {', '.join(ACTIONS)}")
    return str(value)


def _entry(node: Node) -> tuple[list[Rule], list[Rule]]:
    m = node.mapping(_ENTRY)
    if ("use" in m) == ("blocklist" in m):
        raise node.fail("give exactly one of 'use' (a detector or group) or 'blocklist'")
    if "input" not in m and "output" not in m:
        raise node.fail("give an action for 'input', 'output' or both")
    finders: list[Finder]
    if "use" in m:
        use = m["use"].string()
        names = GROUPS.get(use, (use,))
        if names[0] not in BUILTIN:
            known = ", ".join((*GROUPS, *BUILTIN))
            raise m["use"].fail(f"unknown detector {use!r} (known: {known})")
        finders = [BUILTIN[n] for n in names]
        default_name = use
    else:
        default_name = m["name"].string() if "name" in m else "blocklist"
        finders = [_blocklist(m["blocklist"], default_name)]
    name = m["name"].string() if "name" in m else default_name
    act_in, act_out = _action(m, "input"), _action(m, "output")
    return [Rule(name, f, act_in) for f in finders], [Rule(name, f, act_out) for f in finders]


def _blocklist(node: Node, name: str) -> blocklist.Blocklist:
    m = node.mapping(_LIST)
    terms = [n.string() for n in m["terms"].items()] if "terms" in m else []
    regexes = [n.string() for n in m["regexes"].items()] if "regexes" in m else []
    if "file" in m:
        path = m["file"].string()
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise m["file"].fail(f"cannot read {path}: {exc.strerror}") from None
        for line in (s.strip() for s in lines):
            if line.startswith("re:"):
                regexes.append(line[3:].strip())
            elif line and not line.startswith("#"):
                terms.append(line)
    if not terms and not regexes:
        raise node.fail("a blocklist needs 'terms', 'regexes' or a 'file'")
    for i, rx in enumerate(regexes):
        try:
            re.compile(rx)
        except re.error as exc:
            raise ConfigError(f"{node.path}.regexes[{i}]: invalid regex: {exc}") from None
        if re.fullmatch(rx, ""):
            raise ConfigError(f"{node.path}.regexes[{i}]: matches the empty string")
    return blocklist.build(name, terms, regexes)


__all__ = ["ACTIONS", "GuardrailSettings", "Policy", "Rule", "Rules", "Span", "parse_guardrails"]
