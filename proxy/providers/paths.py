"""A model name inside a provider URL path is one opaque segment.

Glob routes pass the client's model name to the provider (Azure's
deployment, Gemini's ``models/{model}``). Quoted with nothing kept safe it
cannot add a segment, a query or a fragment; but "." and ".." survive
quoting and are dot segments that every URL normaliser (yarl's included)
removes, moving the request out of its route. Those are refused.
"""

from __future__ import annotations

from urllib.parse import quote

from proxy.core.errors import InvalidRequest


def segment(name: str) -> str:
    """``name`` quoted as exactly one path segment, or a 400."""
    if name in ("", ".", ".."):
        raise InvalidRequest(
            f"The model name {name!r} cannot be used with this provider: "
            "it must be a single path segment other than '.' or '..'.",
            param="model",
        )
    return quote(name, safe="")
