"""``kind: azure``: deployment URLs, ``api-version``, the ``api-key`` header and
Azure's stream quirks, end to end through the openai SDK against a fake
Azure OpenAI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.conftest import Gateway, StartGateway
from tests.fakes import FAKE_USAGE, WORDS
from tests.fakes_providers import FakeAzure
from tests.schema import validate

MSG: Any = [{"role": "user", "content": "Say hello"}]


def config(url: str, **provider: Any) -> dict[str, Any]:
    return {
        "auth": "none",
        "providers": {
            "azure": {
                "kind": "azure",
                "base_url": url,
                "api_key": "azure-secret",
                "timeouts": {"connect": 2, "first_byte": 2, "idle": 2, "total": 30},
                **provider,
            }
        },
        "models": [
            {"name": "gpt-4o", "targets": [{"provider": "azure", "model": "gpt4o-east"}]},
            {"name": "filtered", "targets": [{"provider": "azure", "model": "content-filter"}]},
            {"name": "broken", "targets": [{"provider": "azure", "model": "error-400"}]},
            {"name": "azure-*", "targets": [{"provider": "azure"}]},
        ],
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeAzure]:
    server = await FakeAzure().start()
    yield server
    await server.close()


@pytest.fixture
async def gw(start_gateway: StartGateway, fake: FakeAzure) -> Gateway:
    return await start_gateway(config(fake.url))


async def test_chat_uses_deployment_url_version_and_api_key(gw: Gateway, fake: FakeAzure) -> None:
    resp = await gw.sdk().chat.completions.create(model="gpt-4o", messages=MSG)
    assert resp.choices[0].message.content == "".join(WORDS)
    validate(resp.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    seen = fake.seen[-1]
    assert seen.path == "/openai/deployments/gpt4o-east/chat/completions"
    assert fake.queries[-1] == {"api-version": "2024-10-21"}
    assert seen.headers["api-key"] == "azure-secret"
    assert "Authorization" not in seen.headers
    assert seen.body == {"model": "gpt4o-east", "messages": MSG}
    usage = gw.settler.records[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (11, 6, "provider")


async def test_a_passed_through_name_stays_one_deployment(gw: Gateway, fake: FakeAzure) -> None:
    """A glob route sends the client's model name as the deployment: it must
    not be able to add a query parameter or leave the deployments path."""
    name = "azure-x?api-version=1999-01-01&key=1"
    resp = await gw.sdk().chat.completions.create(model=name, messages=MSG)
    assert resp.choices[0].message.content == "".join(WORDS)
    assert fake.queries[-1] == {"api-version": "2024-10-21"}
    assert fake.seen[-1].path == f"/openai/deployments/{name}/chat/completions"
    # Unquoted, "../" would be resolved away and the request miss the route.
    climb = "azure-y/../../../other"
    await gw.sdk().chat.completions.create(model=climb, messages=MSG)
    assert fake.seen[-1].path == f"/openai/deployments/{climb}/chat/completions"


async def test_stream_asks_for_usage_and_bills_it(gw: Gateway, fake: FakeAzure) -> None:
    stream = await gw.sdk().chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(WORDS)
    assert all(c.choices for c in chunks)  # the client did not ask for the usage chunk
    assert fake.seen[-1].body["stream_options"] == {"include_usage": True}
    usage = gw.settler.records[-1].usage
    assert usage.completion_tokens == FAKE_USAGE["completion_tokens"]
    assert usage.source == "provider"


async def test_stream_with_azure_content_filter_chunks(gw: Gateway) -> None:
    stream = await gw.sdk().chat.completions.create(
        model="filtered",
        messages=MSG,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    # Azure's prompt-filter chunk (no choices) comes first and passes through.
    assert chunks[0].choices == [] and chunks[0].usage is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello from Azure."
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 13
    usage = gw.settler.records[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (9, 4, "provider")


async def test_embeddings_and_completions_paths(gw: Gateway, fake: FakeAzure) -> None:
    client = gw.sdk()
    emb = await client.embeddings.create(model="azure-embed", input=["a", "b"])  # base64
    assert [d.embedding for d in emb.data] == [[0.25, -0.5, 0.75]] * 2
    assert fake.seen[-1].path == "/openai/deployments/azure-embed/embeddings"
    assert fake.seen[-1].body["encoding_format"] == "base64"
    assert gw.settler.records[-1].usage.prompt_tokens == 5
    done = await client.completions.create(model="azure-instruct", prompt="Say hello")
    assert done.choices[0].text == "".join(WORDS)
    assert fake.seen[-1].path == "/openai/deployments/azure-instruct/completions"
    assert fake.queries[-1] == {"api-version": "2024-10-21"}


async def test_configured_api_version_and_headers(
    start_gateway: StartGateway, fake: FakeAzure
) -> None:
    gw = await start_gateway(
        config(fake.url, api_version="2025-01-01-preview", headers={"x-ms-client": "tollway"})
    )
    await gw.sdk().chat.completions.create(model="gpt-4o", messages=MSG)
    assert fake.queries[-1] == {"api-version": "2025-01-01-preview"}
    assert fake.seen[-1].headers["x-ms-client"] == "tollway"


async def test_client_error_passes_on_with_status(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await gw.sdk().chat.completions.create(model="broken", messages=MSG)
    assert exc.value.status_code == 400
    assert exc.value.body == {
        "message": "fake provider error 400",
        "type": "fake_error",
        "param": None,
        "code": "fake_400",
    }
