"""Secrets sealed with the master key in the YAML (``enc:...``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import sealed
from proxy.config.reader import ConfigError
from proxy.core import redact
from proxy.pipeline.registry import parse_config
from tests.conftest import StartGateway, gateway_config
from tests.fakes import FakeOpenAI

PLAIN = "sk-sealed-provider-key-1234567890"


def _config_with(url: str, api_key: str) -> str:
    cfg = gateway_config(url)
    cfg["providers"]["fake"]["api_key"] = api_key
    return yaml.safe_dump(cfg)


async def test_a_sealed_provider_key_reaches_the_provider_opened(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    master = sealed.new_key()
    cfg = gateway_config(fake_openai.url)
    cfg["providers"]["fake"]["api_key"] = sealed.seal(PLAIN, master)
    gw = await start_gateway(cfg, env={sealed.MASTER_KEY_ENV: master})
    await gw.sdk().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert fake_openai.seen[-1].headers["Authorization"] == f"Bearer {PLAIN}"
    assert PLAIN not in redact.scrub(f"a log line quoting {PLAIN}")  # known to the redactor


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({}, "TOLLWAY_MASTER_KEY is not set"),
        ({sealed.MASTER_KEY_ENV: sealed.new_key()}, "cannot be decrypted"),  # another key
        ({sealed.MASTER_KEY_ENV: "not-a-key"}, "is not a valid key"),
    ],
)
def test_a_sealed_value_that_cannot_be_opened_refuses_the_config(
    env: dict[str, str], why: str
) -> None:
    token = sealed.seal(PLAIN, sealed.new_key())
    with pytest.raises(ConfigError) as exc:
        parse_config(_config_with("http://127.0.0.1:9/v1", token), env)
    message = str(exc.value)
    assert message.startswith("providers.fake.api_key: sealed value") and why in message
    assert PLAIN not in message and token[4:] not in message


def test_a_damaged_token_is_refused() -> None:
    master = sealed.new_key()
    token = sealed.seal(PLAIN, master)
    damaged = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        parse_config(_config_with("http://127.0.0.1:9/v1", damaged), {"TOLLWAY_MASTER_KEY": master})


def test_cli_makes_a_key_and_seals_what_check_config_then_opens(tmp_path: Path) -> None:
    def tollway(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", **(env or {})},
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    master = tollway("seal", "--new-key")
    token = tollway("seal", stdin=PLAIN + "\n", env={sealed.MASTER_KEY_ENV: master})
    assert token.startswith("enc:") and PLAIN not in token
    assert sealed.open_sealed(token, master) == PLAIN  # the newline is not part of it
    path = tmp_path / "tollway.yaml"
    path.write_text(_config_with("http://127.0.0.1:9/v1", token))
    checked = tollway("check-config", str(path), env={sealed.MASTER_KEY_ENV: master})
    assert checked.startswith("ok:")
