"""The README, followed word for word.

Every ``tollway``/``curl``/``export`` command of the README's ``sh`` blocks is
either run here, in the README's order, against a gateway started as ``make
run`` starts it (``tollway serve --migrate --demo``, embedded Postgres and
Redis, an empty data directory), or listed in ``NOT_RUN`` with the reason. A
command the README gains or changes fails ``test_every_command_is_checked``
until it is added here, so the README cannot drift from what the gateway
does. The commands run from a directory outside the checkout, with the
virtualenv's ``bin`` first on PATH (what ``source .venv/bin/activate`` does).
Placeholders the README tells the reader to fill in (``KEY_ID``, ``FREE_KEY``,
the demo key) are filled from earlier output, as a reader would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from asyncio.subprocess import Process
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Example:
    command: str  # continuation lines joined, comment stripped
    answer: str | None  # the ```json block right after its ``sh`` block, if any


def examples(text: str) -> list[Example]:
    """The runnable shell commands of the README, in order."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, re.DOTALL)
    found = []
    for i, (lang, body) in enumerate(blocks):
        if lang != "sh":
            continue
        after = blocks[i + 1] if i + 1 < len(blocks) else ("", "")
        answer = after[1].strip() if after[0] == "json" else None
        joined = re.sub(r"\\\n\s*", "", body)
        for line in joined.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command.startswith(("tollway ", "curl ", "export ")) or " tollway " in command:
                found.append(Example(command, answer))
    return found


@dataclass
class Reader:
    """What a reader knows while following the README: the port, the values to paste."""

    port: int
    env: dict[str, str]
    cwd: Path
    pasted: dict[str, str] = field(default_factory=dict)

    def fill(self, command: str) -> str:
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}")
        for placeholder, value in self.pasted.items():
            command = re.sub(rf"\b{re.escape(placeholder)}\b", value, command)
        return command

    async def run(self, command: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            self.fill(command),
            cwd=self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, f"{command}\n{err.decode()}"
        assert not err.strip(), f"{command} wrote to stderr:\n{err.decode()}"
        return out.decode()


Check = Callable[[Reader, str, Example], None]


def _json_equals_readme(reader: Reader, out: str, ex: Example) -> None:
    assert ex.answer is not None, f"no json block after {ex.command}"
    assert json.loads(out) == json.loads(ex.answer)


def _chat_echo(reader: Reader, out: str, ex: Example) -> None:
    answer = json.loads(out)
    assert answer["choices"][0]["message"]["content"] == "Hello, Tollway!"
    assert answer["usage"]["total_tokens"] > 0


def _stream_echo(reader: Reader, out: str, ex: Example) -> None:
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in map(json.loads, events[:-1])
        if c["choices"]
    )
    assert text == "Hello"


def _messages_echo(reader: Reader, out: str, ex: Example) -> None:
    answer = json.loads(out)
    assert answer["type"] == "message" and answer["stop_reason"] == "end_turn"
    assert answer["content"] == [{"type": "text", "text": "Hello, Claude SDK!"}]
    assert answer["usage"]["input_tokens"] > 0


def _paste_key_id(name: str) -> Check:
    def check(reader: Reader, out: str, ex: Example) -> None:
        reader.pasted[name] = json.loads(out)["key_id"]

    return check


def _paste_api_key(name: str) -> Check:
    def check(reader: Reader, out: str, ex: Example) -> None:
        reader.pasted[name] = json.loads(out)["api_key"]

    return check


def _rotated(reader: Reader, out: str, ex: Example) -> None:
    fields = dict(word.split("=", 1) for word in out.split() if "=" in word)
    assert fields["replaces"] == reader.pasted["KEY_ID"] and fields["api_key"].startswith("tw-")
    reader.pasted["NEW_KEY_ID"] = fields["key_id"]


def _contains(*words: str) -> Check:
    def check(reader: Reader, out: str, ex: Example) -> None:
        assert all(w in out for w in words), out

    return check


def _usage(reader: Reader, out: str, ex: Example) -> None:
    usage = json.loads(out)
    assert usage["tier"] == "pro", usage  # the demo tenant's tier, as the README says


def _demo_spend(reader: Reader, out: str, ex: Example) -> None:
    """The demo's requests so far, priced (echo has a pretend price)."""
    echo = {row["model"]: row for row in json.loads(out)}["echo"]
    assert echo["requests"] >= 2 and float(echo["cost_usd"]) > 0, echo


def _ok(reader: Reader, out: str, ex: Example) -> None:
    pass


def _webhook_added(reader: Reader, out: str, ex: Example) -> None:
    fields = dict(word.split("=", 1) for word in out.split() if "=" in word)
    assert fields["tenant"] == "acme" and fields["secret"].startswith("whsec_"), out
    assert "only time the webhook secret is shown" in out
    reader.pasted["WEBHOOK_ID"] = fields["id"]


def _webhook_listed(reader: Reader, out: str, ex: Example) -> None:
    assert reader.pasted["WEBHOOK_ID"] in out and "whsec_" not in out, out


CHAT = (
    'curl -s http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer {key}" '
    "-H \"Content-Type: application/json\" -d '{body}'"
)
CHECKS: dict[str, Check] = {
    "export TOLLWAY_KEY=tw-3q0v...": _ok,  # the reader pastes the demo key: see fill
    CHAT.format(
        key="$TOLLWAY_KEY",
        body='{"model": "echo", "messages": [{"role": "user", "content": "Hello, Tollway!"}]}',
    ): _chat_echo,
    CHAT.format(
        key="$TOLLWAY_KEY",
        body='{"model": "echo", "stream": true, "messages": '
        '[{"role": "user", "content": "Hello"}]}',
    ).replace("curl -s ", "curl -sN "): _stream_echo,
    CHAT.format(
        key="$TOLLWAY_KEY",
        body='{"model": "llama-9", "messages": [{"role": "user", "content": "Hi"}]}',
    ): _json_equals_readme,
    "curl -s http://127.0.0.1:8080/v1/messages "
    '-H "x-api-key: $TOLLWAY_KEY" -H "anthropic-version: 2023-06-01" '
    '-H "Content-Type: application/json" '
    '-d \'{"model": "echo", "max_tokens": 100, "messages": '
    '[{"role": "user", "content": "Hello, Claude SDK!"}]}\'': _messages_echo,
    "tollway migrate": _contains("database is up to date"),
    "tollway tenants list": _contains("name=demo", "tier=pro"),
    "tollway tenants create acme --tier pro": _contains("name=acme"),
    "tollway keys create --tenant acme --name ci-bot --expires-in-days 365 --json": (
        _paste_key_id("KEY_ID")
    ),
    "tollway keys list --tenant acme": lambda r, out, ex: _contains(r.pasted["KEY_ID"])(r, out, ex),
    "tollway keys rotate KEY_ID": _rotated,
    "tollway keys revoke NEW_KEY_ID": _contains("state=revoked"),
    "tollway tenants set-tier acme enterprise": _contains("tier=enterprise"),
    'curl -s -H "Authorization: Bearer $TOLLWAY_KEY" http://127.0.0.1:8080/v1/usage': _usage,
    "tollway tenants create trial --tier free": _contains("name=trial"),
    "tollway keys create --tenant trial --json": _paste_api_key("FREE_KEY"),
    CHAT.format(
        key="FREE_KEY",
        body='{"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}',
    ): _json_equals_readme,
}
CHECKS |= {
    "tollway usage": _contains("cost_usd"),
    "tollway tenants set-budget acme --monthly-usd 50 --daily-usd 5": _contains(
        "'monthly_usd': 50.0", "'daily_usd': 5.0"
    ),
    "tollway tenants set-budget acme --daily-usd none": _contains(
        "'daily_usd': None", "'monthly_usd': 50.0"
    ),
    "tollway keys set-budget KEY_ID --daily-usd 1": _contains("budgets={'daily_usd': 1.0}"),
    "tollway tenants set-budget acme --clear": _contains("name=acme"),
    "tollway usage --tenant demo --group-by model --json": _demo_spend,
    "tollway usage --from 2025-06-01 --to 2025-06-30 --group-by key --csv": _contains(
        "key,requests,errors"
    ),
}
CHECKS |= {
    "tollway webhooks add --tenant acme --url https://hooks.example.com/tollway "
    "--events batch.completed,batch.failed": _webhook_added,
    "tollway webhooks list --tenant acme": _webhook_listed,
}
NOT_RUN = {
    'curl -s -H "Authorization: Bearer $TOLLWAY_ADMIN_KEY" "http://127.0.0.1:8080/admin/usage?'
    'tenant=demo&group_by=model&from=2025-06-01&to=2025-06-30"': (
        "the admin API is off in this run; tests/test_usage_rollups.py calls /admin/usage"
    ),
    "curl -s -X PATCH http://127.0.0.1:8080/admin/tenants/acme "
    '-H "Authorization: Bearer $TOLLWAY_ADMIN_KEY" -d \'{"budgets": {"monthly_usd": 50}}\'': (
        "the admin API is off in this run; tests/test_budget_overrides.py calls it"
    ),
    "tollway seal --new-key": "tests/test_sealed.py runs the seal commands",
    "export TOLLWAY_MASTER_KEY=...": "tests/test_sealed.py runs the seal commands",
    "printf '%s\\n' \"$OPENAI_API_KEY\" | tollway seal": "tests/test_sealed.py",
    "curl -s -D - -o /dev/null http://127.0.0.1:8080/v1/chat/completions "
    '-H "Authorization: Bearer $TOLLWAY_KEY" -H "Content-Type: application/json" '
    '-d \'{"model": "echo", "messages": [{"role": "user", "content": '
    '"What is the capital of France?"}]}\'': "tests/test_semantic_cache.py (paraphrase hit)",
    "tollway cache purge --tenant demo --model echo": "tests/test_semantic_cache.py (purge)",
    "curl -s -X POST http://127.0.0.1:8080/admin/cache/purge "
    '-H "Authorization: Bearer $TOLLWAY_ADMIN_KEY" -d \'{"tenant": "demo"}\'': (
        "tests/test_semantic_cache.py (purge)"
    ),
}


def test_every_command_is_checked() -> None:
    found = [ex.command for ex in examples(README.read_text(encoding="utf-8"))]
    assert len(found) >= len(CHECKS)
    unknown = [c for c in found if c not in CHECKS and c not in NOT_RUN]
    assert not unknown, "README commands this test does not check:\n" + "\n".join(unknown)
    missing = [c for c in [*CHECKS, *NOT_RUN] if c not in found]
    assert not missing, "checked commands no longer in the README:\n" + "\n".join(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(env: dict[str, str], cwd: Path, port: int) -> tuple[Process, str]:
    """``tollway serve --migrate --demo`` (what ``make run`` runs) and its output
    up to the ready line."""
    serve = await asyncio.create_subprocess_exec(
        str(BIN / "tollway"),
        *("serve", "--migrate", "--demo", "--port", str(port)),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert serve.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not lines or "listening on" not in lines[-1]:
                lines.append((await serve.stdout.readline()).decode())
                assert lines[-1], "".join(lines)
    except BaseException:
        await _stop(serve)
        raise
    return serve, "".join(lines)


async def _stop(serve: Process) -> None:
    if serve.returncode is None:
        serve.terminate()
    await serve.wait()


@pytest.mark.slow
@pytest.mark.timeout(360)  # two starts of the embedded servers and every example, on a busy CI core
async def test_the_readme_examples_answer_as_written(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"  # not the checkout: the commands work from anywhere
    elsewhere.mkdir()
    unset = ("DATABASE_URL", "REDIS_URL", "TOLLWAY_CONFIG", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "TOLLWAY_DATA_DIR": str(tmp_path)}
    port = _free_port()
    serve, output = await _serve(env, elsewhere, port)
    try:
        assert "Warning" not in output, output  # no dependency noise on the terminal
        demo = re.search(r"export TOLLWAY_KEY=(tw-\S+)", output)
        assert demo is not None and "(tier pro)" in output, output
        reader = Reader(port, {**env, "TOLLWAY_KEY": demo.group(1)}, elsewhere)
        for ex in examples(README.read_text(encoding="utf-8")):
            if ex.command in NOT_RUN:
                continue
            check = CHECKS[ex.command]
            out = "" if ex.command.startswith("export ") else await reader.run(ex.command)
            check(reader, out, ex)
    finally:
        await _stop(serve)
    # The next `make run`: no key this time, but how to get one.
    serve, output = await _serve(env, elsewhere, _free_port())
    await _stop(serve)
    assert "tw-" not in output
    assert "Tenant 'demo' (tier pro) exists" in output, output
    assert "tollway keys create --tenant demo" in output
