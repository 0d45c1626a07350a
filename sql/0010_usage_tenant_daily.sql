-- Tollway ledger, version 10: daily rollups per tenant alone.
--
-- The same sums as usage_daily without the key and model columns: one row per
-- tenant per UTC day (a year of a tenant is 365 rows, however many keys and
-- models it has), kept by the ledger in the same statement as usage_daily and
-- usage_monthly (only newly inserted rows count). A group_by=day report with
-- no key or model filter reads these instead of every key x model day.
CREATE TABLE usage_tenant_daily (
    day                date NOT NULL,
    tenant_id          bigint NOT NULL,
    requests           bigint NOT NULL DEFAULT 0,
    errors             bigint NOT NULL DEFAULT 0,
    cache_hits         bigint NOT NULL DEFAULT 0,
    prompt_tokens      bigint NOT NULL DEFAULT 0,
    completion_tokens  bigint NOT NULL DEFAULT 0,
    cached_tokens      bigint NOT NULL DEFAULT 0,
    reasoning_tokens   bigint NOT NULL DEFAULT 0,
    cost_usd           numeric(20, 8) NOT NULL DEFAULT 0,
    unpriced           bigint NOT NULL DEFAULT 0,
    -- Tenant first: a tenant's days are one index range.
    PRIMARY KEY (tenant_id, day)
);

-- The daily rollups so far, once, so these start complete.
INSERT INTO usage_tenant_daily
SELECT d.day, d.tenant_id, sum(d.requests), sum(d.errors), sum(d.cache_hits),
       sum(d.prompt_tokens), sum(d.completion_tokens), sum(d.cached_tokens),
       sum(d.reasoning_tokens), sum(d.cost_usd), sum(d.unpriced)
FROM usage_daily d
GROUP BY 1, 2;
