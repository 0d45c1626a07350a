"""Settlers: billing, metrics and the access log, each told of every request."""
