"""Traces: the ``tracing:`` section and its OpenTelemetry spans (off by default)."""
