"""A Prometheus registry as the answer to ``GET /metrics``.

The one place the text format is rendered: the gateway's ``/metrics``
(``web.observe``) and the yardstick's (``bench/floor_proxy.py``, which
serves the loop-lag probe alone). Here, below both, so the yardstick
imports it without loading the gateway.
"""

from __future__ import annotations

from aiohttp import web
from aioprometheus import Registry, render


def text(registry: Registry) -> web.Response:
    """``registry`` in Prometheus' text format. The text format only:
    Prometheus accepts it, and the binary one needs an extra protobuf package."""
    body, headers = render(registry, [])
    return web.Response(body=body, headers=dict(headers))
