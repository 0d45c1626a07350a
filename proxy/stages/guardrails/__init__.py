"""Guardrails: PII, secret, blocklist and moderation checks on prompts and answers.

``detectors`` finds things (a compiled pattern plus a validator),
``config`` reads the YAML ``guardrails:`` section into policies, ``scan``
applies one policy's actions to a text, ``body`` walks requests and replies,
``stream`` does it incrementally on SSE streams, ``moderation`` and
``verdict`` ask a moderation model about a prompt, and ``stage`` plugs it
all into the pipeline before the cache.
"""
