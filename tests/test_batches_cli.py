"""``tollway batches list|show|cancel``: the operator's view of every tenant's batches."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.batch_helpers import chat_line, create_batch, finished
from tests.billing_helpers import billing_config
from tests.conftest import StartKeyed
from tests.fakes import FakeOpenAI
from tests.test_cli import _env, _tollway


async def test_list_show_and_cancel_a_batch(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    pg_url: str,
    tmp_path: Path,
) -> None:
    cfg = billing_config(fake_openai.url)
    # this instance runs no lines: the batch waits, so the operator can cancel it
    cfg["batches"] = {"enabled": False, "poll_interval_s": 0.05}
    keyed = await start_keyed(cfg)
    client = keyed.sdk()
    batch = await create_batch(
        client, [chat_line(f"l{i}", "fake-model") for i in range(3)], tmp_path
    )
    env = _env(pg_url, tmp_path)

    def tollway(*args: str) -> str:
        done = _tollway("batches", *args, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = await asyncio.to_thread(tollway, "list", "--tenant", keyed.tenant)
    assert batch.id in listed and "in_progress" in listed
    shown = json.loads(await asyncio.to_thread(tollway, "show", batch.id))
    assert shown["status"] == "in_progress" and shown["request_counts"]["total"] == 3
    cancelled = json.loads(await asyncio.to_thread(tollway, "cancel", batch.id))
    assert cancelled["status"] == "cancelling"
    done = await finished(client, batch.id, status="cancelled")  # the gateway's sweep ends it
    assert done.request_counts is not None and done.request_counts.completed == 0
    missing = await asyncio.to_thread(_tollway, "batches", "show", "batch_nope", env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("tollway: no batch")
