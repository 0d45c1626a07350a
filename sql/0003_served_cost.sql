-- Tollway ledger, version 3: a usage row's cost may be unknown.
--
-- cost_usd is priced at the model that served the request. When tokens were
-- used and no price is configured for that model, the row records NULL (and
-- the gateway logs a warning and counts tollway_unpriced_requests_total):
-- unknown, never a silent $0. Sums over cost_usd skip NULLs, so a report can
-- count them apart: count(*) FILTER (WHERE cost_usd IS NULL AND counted).

ALTER TABLE usage_events ALTER COLUMN cost_usd DROP NOT NULL;
