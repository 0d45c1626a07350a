-- Tollway ledger, version 6: monthly usage rollups.
--
-- The same sums as usage_daily per tenant x key x model, per UTC month (month:
-- its first day), kept by the ledger in the same statement as usage_daily
-- (only newly inserted rows count). A report over a range reads these for the
-- whole months inside it and usage_daily only for the partial months at its
-- ends, so a year is at most 12 + 60 rows per key x model, not 365.
CREATE TABLE usage_monthly (
    month              date NOT NULL,
    tenant_id          bigint NOT NULL,
    key_id             text NOT NULL DEFAULT '',
    public_model       text NOT NULL DEFAULT '',
    provider           text NOT NULL DEFAULT '',
    served_model       text NOT NULL DEFAULT '',
    requests           bigint NOT NULL DEFAULT 0,
    errors             bigint NOT NULL DEFAULT 0,
    cache_hits         bigint NOT NULL DEFAULT 0,
    prompt_tokens      bigint NOT NULL DEFAULT 0,
    completion_tokens  bigint NOT NULL DEFAULT 0,
    cached_tokens      bigint NOT NULL DEFAULT 0,
    reasoning_tokens   bigint NOT NULL DEFAULT 0,
    cost_usd           numeric(20, 8) NOT NULL DEFAULT 0,
    unpriced           bigint NOT NULL DEFAULT 0,
    -- Tenant first: a tenant's months are one index range.
    PRIMARY KEY (tenant_id, month, key_id, public_model, provider, served_model)
);

-- group_by=day reads every daily row of the tenant's range (a year of a tenant
-- of 50 keys x 10 models: 182,500): the tenant's index now carries the sums
-- and the model columns, so that is an index-only scan (no heap page per row).
-- The price: a rollup upsert is no longer a HOT update (one per key x model
-- per ledger flush). A one-key report reads only that key's days.
DROP INDEX usage_daily_tenant;
CREATE INDEX usage_daily_tenant ON usage_daily (tenant_id, day)
    INCLUDE (public_model, served_model, requests, errors, cache_hits, prompt_tokens,
             completion_tokens, cached_tokens, reasoning_tokens, cost_usd, unpriced);
CREATE INDEX usage_daily_key ON usage_daily (tenant_id, key_id, day);

-- The daily rollups so far, once, so the monthly ones start complete.
INSERT INTO usage_monthly
SELECT date_trunc('month', d.day)::date, d.tenant_id, d.key_id, d.public_model, d.provider,
       d.served_model, sum(d.requests), sum(d.errors), sum(d.cache_hits), sum(d.prompt_tokens),
       sum(d.completion_tokens), sum(d.cached_tokens), sum(d.reasoning_tokens),
       sum(d.cost_usd), sum(d.unpriced)
FROM usage_daily d
GROUP BY 1, 2, 3, 4, 5, 6;
