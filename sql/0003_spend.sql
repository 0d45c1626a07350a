-- Tollway ledger, version 3: spend. A usage row's cost may be unknown; attribution.
--
-- cost_usd is priced at the model that served the request. When tokens were
-- used and no price is configured for that model, the row records NULL (and
-- the gateway logs a warning and counts tollway_unpriced_requests_total):
-- unknown, never a silent $0. Sums over cost_usd skip NULLs, so a report can
-- count them apart: count(*) FILTER (WHERE cost_usd IS NULL AND counted).

ALTER TABLE usage_events ALTER COLUMN cost_usd DROP NOT NULL;

-- Attribution, per usage row: the OpenAI `user` field, the request's tags
-- (`metadata` body field and `x-tollway-tags` header, bounded and validated
-- at parse), and the client's address (X-Forwarded-For honoured only from
-- server.trusted_proxies).
ALTER TABLE usage_events
    ADD COLUMN end_user text,
    ADD COLUMN tags jsonb,
    ADD COLUMN client_ip text;

-- When a key was last used: set by the ledger once per usage batch (the
-- newest row of the key in the batch), not per request.
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;
