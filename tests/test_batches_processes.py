"""Under ``tollway serve --workers N`` batch lines run in a batch process of
their own, at a lower OS priority (niceness and SCHED_IDLE), and the HTTP
workers run none: with the batch process frozen (SIGSTOP) a batch makes no
progress while the HTTP workers keep answering; once it runs again the
batch completes, each line in its output file and billed once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai

from tests.batch_helpers import chat_line, finished, lines_of, rows_per_line, upload
from tests.billing_helpers import billing_config, tenant_with_key
from tests.fakes import FakeOpenAI
from tests.test_supervisor import Tollway, tollway  # noqa: F401 - the fixture
from tests.waiting import until

LINES = 30
NICE = 7
MSG = [{"role": "user", "content": "hi"}]


def _children(parent: int) -> dict[int, str]:
    """The supervisor's worker processes and their ``TOLLWAY_ROLE``, from /proc."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            roles = [x.split(b"=", 1)[1].decode() for x in env if x.startswith(b"TOLLWAY_ROLE=")]
            found[int(entry)] = roles[0] if roles else ""
    return found


async def test_batch_lines_run_in_their_own_niced_process(
    tollway: Any,  # noqa: F811 - the fixture
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    cfg = billing_config(fake_openai.url)
    cfg["batches"] = {"poll_interval_s": 0.05, "nice": NICE, "workers": 1, "idle_priority": True}
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    t: Tollway = await tollway(cfg, "--workers", "2")
    assert "with 2 workers and 1 batch worker" in t.output[-1]

    children: dict[int, str] = {}

    async def all_started() -> bool:
        nonlocal children
        children = _children(t.proc.pid)
        return len(children) == 3

    await until(all_started, 10, what="three worker processes")
    assert sorted(children.values()) == ["http", "http", "lines"]
    batch_pid = next(pid for pid, role in children.items() if role == "lines")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, batch_pid) == min(19, base + NICE)
    # ... and, as asked, in the idle scheduling class: CPU nothing else wants.
    assert os.sched_getscheduler(batch_pid) == os.SCHED_IDLE
    for pid, role in children.items():
        if role == "http":
            assert os.getpriority(os.PRIO_PROCESS, pid) == base
            assert os.sched_getscheduler(pid) == os.SCHED_OTHER

    client = openai.AsyncOpenAI(base_url=t.url + "/v1", api_key=key["api_key"], max_retries=0)
    os.kill(batch_pid, signal.SIGSTOP)
    try:
        lines = [chat_line(f"l{i}", "fake-model") for i in range(LINES)]
        batch = await client.batches.create(
            input_file_id=await upload(client, lines, tmp_path),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        # The HTTP workers answer meanwhile, on fresh connections (both of them)...
        connector = aiohttp.TCPConnector(force_close=True)
        headers = {"Authorization": f"Bearer {key['api_key']}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as s:
            for _ in range(10):
                body = {"model": "fake-model", "messages": MSG}
                async with s.post(t.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
        # ... but run no line: a window of many polls (0.05 s) in which
        # an HTTP worker that leased lines would have run some.
        await asyncio.sleep(1.0)
        pending = await pg.fetchval(
            "SELECT count(*) FROM batch_lines WHERE batch_id = $1 AND state = 'pending'"
            " AND attempts = 0",
            batch.id,
        )
        assert pending == LINES, "an HTTP worker ran batch lines"
        assert (await client.batches.retrieve(batch.id)).request_counts.completed == 0  # type: ignore[union-attr]
    finally:
        os.kill(batch_pid, signal.SIGCONT)

    done = await finished(client, batch.id, limit=60)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (LINES, 0)
    output = await lines_of(client, done.output_file_id)
    assert sorted(x["custom_id"] for x in output) == sorted(f"l{i}" for i in range(LINES))

    async def billed() -> bool:
        return len(await rows_per_line(pg, tenant)) == LINES

    await until(billed, 20, what="a usage row for every line")
    rows = await rows_per_line(pg, tenant)
    assert {k: len(v) for k, v in rows.items()} == {x["id"]: 1 for x in output}

    t.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(t.proc.wait(), 60) == 0
    for pid in children:  # reaped by the supervisor before it exited
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} outlived the supervisor")
