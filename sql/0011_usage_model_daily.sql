-- Tollway ledger, version 11: daily rollups per tenant and model.
--
-- A group_by=day report filtered to one model (``model=X`` matches the model
-- asked for or the one that served) summed every key x model day of the
-- tenant in usage_daily: 66-85 ms over a year of a tenant with 50 keys and 10
-- models. Here each usage row counts once under every distinct name among
-- its public and served model (one name when they are the same, two for a
-- fallback or an alias), so the rows of one model are exactly the rows that
-- filter matches: a year of one model is 365 rows. Kept by the ledger in the
-- same statement as the other rollups (only newly inserted rows count).
CREATE TABLE usage_model_daily (
    day                date NOT NULL,
    tenant_id          bigint NOT NULL,
    model              text NOT NULL,
    requests           bigint NOT NULL DEFAULT 0,
    errors             bigint NOT NULL DEFAULT 0,
    cache_hits         bigint NOT NULL DEFAULT 0,
    prompt_tokens      bigint NOT NULL DEFAULT 0,
    completion_tokens  bigint NOT NULL DEFAULT 0,
    cached_tokens      bigint NOT NULL DEFAULT 0,
    reasoning_tokens   bigint NOT NULL DEFAULT 0,
    cost_usd           numeric(20, 8) NOT NULL DEFAULT 0,
    unpriced           bigint NOT NULL DEFAULT 0,
    -- Model first: one model's days are one index range, for one tenant or all.
    PRIMARY KEY (model, tenant_id, day)
);

-- The daily rollups so far, once, so these start complete.
INSERT INTO usage_model_daily
SELECT d.day, d.tenant_id, m.model, sum(d.requests), sum(d.errors), sum(d.cache_hits),
       sum(d.prompt_tokens), sum(d.completion_tokens), sum(d.cached_tokens),
       sum(d.reasoning_tokens), sum(d.cost_usd), sum(d.unpriced)
FROM usage_daily d
CROSS JOIN LATERAL (SELECT d.public_model UNION SELECT d.served_model) AS m(model)
GROUP BY 1, 2, 3;
