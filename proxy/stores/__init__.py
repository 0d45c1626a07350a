"""Postgres (ledger, keys, quota) and Redis (client, rate-limit windows)."""
