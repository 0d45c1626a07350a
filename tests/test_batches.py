"""The Files and Batch APIs end to end, through the official openai SDK, as a
user would drive them: upload, create, poll, download, cancel; each line run
through the pipeline and billed once; a tenant sees only its own objects."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from proxy.stores.batch_rows import line_event_id, line_request_id
from proxy.web.keys import BATCH_WORKER
from tests.batch_helpers import chat_line, create_batch, finished, lines_of, rows_per_line, upload
from tests.billing_helpers import billing_config, wait_for
from tests.conftest import StartKeyed
from tests.fakes import WORDS, FakeOpenAI
from tests.fakes_providers import FakeAnthropic
from tests.schema import validate
from tests.waiting import until


def _config(fake_url: str, **batches: Any) -> dict[str, Any]:
    cfg = billing_config(fake_url)
    cfg["batches"] = {"poll_interval_s": 0.05, **batches}
    return cfg


async def test_batch_runs_to_completion_with_output_and_error_files(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    keyed = await start_keyed(_config(fake_openai.url))
    client = keyed.sdk()
    lines = [chat_line(f"ok-{i}", "fake-model") for i in range(5)]
    lines.insert(2, chat_line("poison", "fake-error-400"))  # the provider refuses this one
    file_id = await upload(client, lines, tmp_path)
    got = await client.files.retrieve(file_id)
    validate(got.model_dump(mode="json", exclude_unset=True), "OpenAIFile")
    assert got.purpose == "batch" and got.bytes > 0 and got.expires_at is not None

    batch = await client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    validate(batch.model_dump(mode="json", exclude_unset=True), "Batch")
    assert batch.status == "in_progress" and batch.metadata == {"job": "nightly"}
    assert batch.request_counts is not None and batch.request_counts.total == 6

    done = await finished(client, batch.id)
    validate(done.model_dump(mode="json", exclude_unset=True), "Batch")
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 1)
    assert done.completed_at is not None and done.finalizing_at is not None

    output = await lines_of(client, done.output_file_id)
    assert sorted(x["custom_id"] for x in output) == [f"ok-{i}" for i in range(5)]
    for x in output:
        assert x["error"] is None and x["id"].startswith("batch_req_")
        assert x["response"]["status_code"] == 200
        assert x["response"]["request_id"] == x["id"]
        assert x["response"]["body"]["choices"][0]["message"]["content"] == "".join(WORDS)
        validate(x["response"]["body"], "CreateChatCompletionResponse")
    (error,) = await lines_of(client, done.error_file_id)
    assert error["custom_id"] == "poison"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "fake_400"
    out_file = await client.files.retrieve(str(done.output_file_id))
    validate(out_file.model_dump(mode="json", exclude_unset=True), "OpenAIFile")
    assert out_file.purpose == "batch_output"

    # every line went through billing once: one row each, counted unless refused
    await until(lambda: _all_rows(pg, keyed.tenant, 6), 10, what="six usage rows")
    rows = await rows_per_line(pg, keyed.tenant)
    assert {k: len(v) for k, v in rows.items()} == {x["id"]: 1 for x in [*output, error]}
    assert sorted(r[0]["status"] for r in rows.values()) == [200] * 5 + [400]

    listed = await client.batches.list(limit=10)
    validate(listed.model_dump(mode="json", exclude_unset=True), "ListBatchesResponse")
    assert done.id in [b.id for b in listed.data]
    files = await client.files.list()
    validate(files.model_dump(mode="json", exclude_unset=True), "ListFilesResponse")
    assert {file_id, done.output_file_id, done.error_file_id} <= {f.id for f in files.data}
    deleted = await client.files.delete(file_id)
    validate(deleted.model_dump(mode="json", exclude_unset=True), "DeleteFileResponse")
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(file_id)


async def _all_rows(pg: asyncpg.Pool, tenant: str, n: int) -> bool:
    rows = await rows_per_line(pg, tenant)
    return sum(len(v) for v in rows.values()) >= n


async def test_batches_to_echo_and_anthropic(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> None:
    anthropic = await FakeAnthropic().start()
    try:
        cfg = _config(fake_openai.url)
        cfg["providers"]["anthropic"] = {
            "kind": "anthropic",
            "base_url": anthropic.url + "/v1",
            "api_key": "sk-ant-secret",
            "timeouts": {"connect": 2, "first_byte": 2, "idle": 2, "total": 30},
        }
        cfg["models"].append({"name": "claude-*", "targets": [{"provider": "anthropic"}]})
        keyed = await start_keyed(cfg)
        client = keyed.sdk()
        lines = [chat_line("echo-1", "echo"), chat_line("claude-1", "claude-text")]
        file_id = await upload(client, lines, tmp_path)
        batch = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await finished(client, batch.id)
        assert done.error_file_id is None
        by_id = {x["custom_id"]: x for x in await lines_of(client, done.output_file_id)}
        assert set(by_id) == {"echo-1", "claude-1"}
        for x in by_id.values():
            assert x["response"]["status_code"] == 200
            validate(x["response"]["body"], "CreateChatCompletionResponse")
        assert (
            "hello echo-1"
            in by_id["echo-1"]["response"]["body"]["choices"][0]["message"]["content"]
        )
        assert anthropic.seen and anthropic.seen[-1].body["model"] == "claude-text"
    finally:
        await anthropic.close()


async def test_another_tenant_sees_nothing(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> None:
    keyed = await start_keyed(_config(fake_openai.url))
    client, other = keyed.sdk(), (await keyed.another()).sdk()
    file_id = await upload(client, [chat_line("a", "fake-model")], tmp_path)
    batch = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        other.files.retrieve(file_id),
        other.files.content(file_id),
        other.files.delete(file_id),
        other.batches.retrieve(batch.id),
        other.batches.cancel(batch.id),
        other.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError) as exc:
            await call
        validate(exc.value.body and {"error": exc.value.body}, "ErrorResponse")
    assert file_id not in [f.id for f in (await other.files.list()).data]
    assert batch.id not in [b.id for b in (await other.batches.list()).data]
    await finished(client, batch.id)  # and the owner's batch ran


async def test_cancel_mid_run_ends_cancelled_with_what_completed(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> None:
    cfg = _config(fake_openai.url, worker_concurrency=1, batch_concurrency=1)
    keyed = await start_keyed(cfg)
    client = keyed.sdk()
    file_id = await upload(client, [chat_line(f"l{i}", "fake-model") for i in range(300)], tmp_path)
    batch = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def started() -> bool:
        b = await client.batches.retrieve(batch.id)
        return b.request_counts is not None and b.request_counts.completed >= 2

    await until(started, 20, interval=0.02)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = await finished(client, batch.id, status="cancelled")
    validate(done.model_dump(mode="json", exclude_unset=True), "Batch")
    assert done.cancelled_at is not None and done.cancelling_at is not None
    assert done.request_counts is not None
    completed = done.request_counts.completed
    assert 2 <= completed < 300
    assert len(await lines_of(client, done.output_file_id)) == completed
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(
            (await finished(client, await _quick_batch(client, tmp_path))).id
        )


async def _quick_batch(client: openai.AsyncOpenAI, tmp_path: Path) -> str:
    file_id = await upload(client, [chat_line("q", "fake-model")], tmp_path)
    made = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return made.id


async def test_exhausted_quota_pauses_the_batch_instead_of_failing_it(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    cfg = _config(fake_openai.url, quota_retry_s=3600)
    keyed = await start_keyed(cfg, "tiny")  # 10 requests a month
    client = keyed.sdk()
    file_id = await upload(client, [chat_line(f"l{i}", "fake-model") for i in range(12)], tmp_path)
    batch = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # ten lines run, the two the quota refused wait (an hour) instead of failing
    await wait_for(
        pg,
        "SELECT array_agg(n ORDER BY s) FROM (SELECT state AS s, count(*) AS n FROM batch_lines"
        " WHERE batch_id = $1"
        " AND (state <> 'pending' OR not_before > now() + interval '10 minutes')"
        " GROUP BY state) c",
        batch.id,
        expect=[10, 2],  # completed, pending
        limit=20,
    )
    now = await client.batches.retrieve(batch.id)
    assert now.status == "in_progress"
    assert now.request_counts is not None
    assert (now.request_counts.completed, now.request_counts.failed) == (10, 0)
    # the ten that ran are billed; the two waiting lines are not (yet)
    await wait_for(
        pg,
        "SELECT count(*) FROM usage_events u JOIN tenants t ON t.id = u.tenant_id"
        " WHERE t.name = $1 AND u.counted AND u.request_id LIKE 'batch_req_%'",
        keyed.tenant,
        expect=10,
    )


async def test_uploads_are_checked_line_by_line(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> None:
    cfg = _config(fake_openai.url, max_file_bytes=4096)
    keyed = await start_keyed(cfg)
    client = keyed.sdk()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",'
        b' "body": {"model": "echo"}}\n\n{"custom_id": "b", "method": "GET"}\n'
    )
    with pytest.raises(openai.BadRequestError) as exc:
        await client.files.create(file=bad.open("rb"), purpose="batch")
    assert "Line 3" in exc.value.message and exc.value.code == "invalid_file"
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(openai.APIStatusError) as too_big:
        await client.files.create(file=big.open("rb"), purpose="batch")
    assert too_big.value.status_code == 413
    # a file whose lines target another endpoint makes a failed batch, line by line
    file_id = await upload(
        client, [chat_line("a", "echo"), chat_line("b", "echo", "/v1/embeddings")], tmp_path
    )
    batch = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    validate(batch.model_dump(mode="json", exclude_unset=True), "Batch")
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [(2, "invalid_url")]


async def test_the_readme_batch_snippet_runs_as_written(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()  # noqa: ASYNC240
    section = readme[readme.index("## Batches and events") :]
    requests = re.search(r"```jsonl\n(.*?)```", section, re.DOTALL)
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert requests is not None and snippet is not None
    assert len(snippet.group(1).strip().splitlines()) <= 5
    keyed = await start_keyed(_config(fake_openai.url))
    path = tmp_path / "requests.jsonl"
    path.write_text(requests.group(1))
    code = snippet.group(1).replace("http://127.0.0.1:8080", keyed.gw.url)
    code = code.replace('"requests.jsonl"', repr(str(path)))
    monkeypatch.setenv("TOLLWAY_KEY", keyed.api_key)
    out = io.StringIO()

    def run() -> None:  # the SDK's blocking client, off the loop the gateway runs on
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})

    await asyncio.wait_for(asyncio.to_thread(run), 60)
    printed = out.getvalue()
    assert "completed=2" in printed and "failed=0" in printed, printed
    answers = [json.loads(x) for x in printed[printed.index("{") :].splitlines() if x.strip()]
    assert sorted(a["custom_id"] for a in answers) == ["a", "b"], printed
    assert {a["response"]["body"]["choices"][0]["message"]["content"] for a in answers} == {
        "first",
        "second",
    }


class RecordingEvents:
    """An ``EventSink`` that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, dict[str, Any]]] = []

    async def publish(self, tenant_id: int, type: str, data: dict[str, Any]) -> None:
        self.events.append((tenant_id, type, data))


async def test_the_worker_emits_progress_and_the_terminal_event(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    cfg = _config(fake_openai.url, worker_concurrency=2)  # a few rounds, each reported
    keyed = await start_keyed(cfg)
    sink = keyed.gw.app[BATCH_WORKER].events = RecordingEvents()
    client = keyed.sdk()
    file_id = await upload(client, [chat_line(f"l{i}", "fake-model") for i in range(20)], tmp_path)
    batch = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await finished(client, batch.id)
    await until(lambda: any(t == "batch.completed" for _, t, _ in sink.events))
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", keyed.tenant)
    mine = [(t, d) for who, t, d in sink.events if d["id"] == batch.id]
    assert all(who == tenant_id for who, _, d in sink.events if d["id"] == batch.id)
    types = [t for t, _ in mine]
    assert types[0] == "batch.progress" and types[-1] == "batch.completed", types
    for _, data in mine:
        validate(data, "Batch")
    assert mine[-1][1]["request_counts"] == {"total": 20, "completed": 20, "failed": 0}


async def test_an_expired_window_ends_the_batch_expired(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    cfg = _config(fake_openai.url, enabled=False)  # no line runs here: all are left to expire
    keyed = await start_keyed(cfg)
    client = keyed.sdk()
    file_id = await upload(client, [chat_line("a", "echo"), chat_line("b", "echo")], tmp_path)
    batch = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # the 24 h window, run out
    await pg.execute("UPDATE batches SET expires_at = now() WHERE id = $1", batch.id)
    done = await finished(client, batch.id, status="expired")
    validate(done.model_dump(mode="json", exclude_unset=True), "Batch")
    assert done.expired_at is not None and done.output_file_id is None
    assert done.request_counts is not None and done.request_counts.failed == 2
    errors = await lines_of(client, done.error_file_id)
    assert sorted(x["custom_id"] for x in errors) == ["a", "b"]
    assert {x["error"]["code"] for x in errors} == {"batch_expired"}
    assert all(x["response"] is None for x in errors)


async def test_lines_yield_to_interactive_requests_in_flight(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> None:
    """While an interactive request is in flight the lines start at most
    ``busy_lines_per_s`` a second (still some: the batch is not starved);
    once it is done they run at full speed and the batch completes."""
    per_s, lines = 4.0, 24
    cfg = _config(fake_openai.url, busy_lines_per_s=per_s, busy_concurrency=1)
    keyed = await start_keyed(cfg)
    client = keyed.sdk()
    interactive = await client.chat.completions.create(
        model="fake-held", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    await interactive.__anext__()  # the stream is open and held: a request in flight

    def started() -> int:  # "fake-model" is routed to "upstream-model"
        return sum(1 for s in fake_openai.seen if s.body.get("model") == "upstream-model")

    batch = await create_batch(
        client, [chat_line(f"l{i}", "fake-model") for i in range(lines)], tmp_path
    )
    t0 = asyncio.get_running_loop().time()
    await until(lambda: started() >= 5, 20, what="five lines started beside the request")
    waited = asyncio.get_running_loop().time() - t0
    # One start each 1/per_s seconds: the fifth no sooner than 4/per_s after
    # the first (the first may start at once). Load only makes it later.
    assert waited >= 4 / per_s - 0.05, f"5 lines started in {waited:.2f}s at {per_s}/s"
    assert started() < lines
    fake_openai.release.set()  # the interactive stream ends
    async for _ in interactive:
        pass
    done = await finished(client, batch.id)
    assert done.request_counts is not None and done.request_counts.completed == lines


async def test_a_line_run_again_in_the_next_month_is_billed_once(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """A worker ran a line and billed it on the last day of a month, then died
    before writing its result; the line runs again after midnight. Its usage
    row is keyed by batch and custom_id, but rows are unique per month: the
    second run's row must go to the first run's month, not make a second."""
    keyed = await start_keyed(_config(fake_openai.url, enabled=False))
    client = keyed.sdk()
    batch = await create_batch(
        client, [chat_line(f"l{i}", "fake-model") for i in range(3)], tmp_path
    )
    # What the dead worker left: l0 leased once (its lease run out) and its
    # row in last month's partition.
    first = await pg.fetchval(
        "UPDATE batch_lines SET attempts = 1, leased_until = now() - interval '1 second'"
        " WHERE batch_id = $1 AND custom_id = 'l0' RETURNING line",
        batch.id,
    )
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", keyed.tenant)
    last_month = await pg.fetchval("SELECT (date_trunc('month', now()) - interval '1 month')::date")
    await pg.execute(
        "INSERT INTO usage_events (period, event_id, request_id, tenant_id, endpoint,"
        " prompt_tokens, completion_tokens, counted, status)"
        " VALUES ($1, $2, $3, $4, 'chat', 9, 20, true, 200)",
        last_month,
        line_event_id(batch.id, "l0"),
        line_request_id(batch.id, first),
        tenant_id,
    )
    worker = keyed.gw.app[BATCH_WORKER]
    policy = worker.policy()
    worker.policy = lambda: dataclasses.replace(policy, enabled=True)  # the worker comes back
    worker.wake()

    done = await finished(client, batch.id)
    assert done.request_counts is not None and done.request_counts.completed == 3
    output = await lines_of(client, done.output_file_id)
    assert sorted(x["custom_id"] for x in output) == ["l0", "l1", "l2"]

    async def billed() -> bool:
        return len(await rows_per_line(pg, keyed.tenant)) == 3

    await until(billed, 20, what="a usage row for every line")
    periods = await pg.fetch(
        "SELECT period FROM usage_events WHERE event_id = $1", line_event_id(batch.id, "l0")
    )
    assert [r["period"] for r in periods] == [last_month]  # one row, the first run's
    assert {k: len(v) for k, v in (await rows_per_line(pg, keyed.tenant)).items()} == {
        x["id"]: 1 for x in output
    }
