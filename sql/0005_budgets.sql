-- Tollway ledger, version 5: USD budgets and daily usage rollups.
--
-- Money is counted in integer micro-dollars (1 USD = 1,000,000), so leases,
-- refunds and counters are exact. A budget's subject is 't:<tenant id>' or
-- 'k:<key id>', its span 'month' (period: first day of the month, UTC) or
-- 'day' (period: the day, UTC).

-- Per-tenant and per-key budget overrides, set through the CLI or the admin
-- API: {"monthly_usd": 25.0, "daily_usd": null}. A name that is absent means
-- "the tier's budget"; a name set to null means "no budget".
ALTER TABLE tenants ADD COLUMN budgets jsonb;
ALTER TABLE api_keys ADD COLUMN budgets jsonb;

-- Settled spend of every tenant and key, per month and per day, moved only by
-- newly inserted usage rows (in the ledger's batch transaction). limit_micros
-- is the budget last seen by a lease call; alerted is the highest threshold
-- (50, 80, 100 percent) already announced for it, so each is announced once.
CREATE TABLE budget_counters (
    subject       text NOT NULL,
    span          text NOT NULL CHECK (span IN ('month', 'day')),
    period        date NOT NULL,
    used_micros   bigint NOT NULL DEFAULT 0,
    limit_micros  bigint,
    alerted       smallint NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, span, period)
);

-- Budget handed to a worker but not yet settled: headroom is
-- limit - used - sum(leases), never allowed below zero by admission.
CREATE TABLE budget_leases (
    worker_id     text NOT NULL,
    subject       text NOT NULL,
    span          text NOT NULL,
    period        date NOT NULL,
    micros        bigint NOT NULL DEFAULT 0,
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (worker_id, subject, span, period)
);
CREATE INDEX budget_leases_counter ON budget_leases (subject, span, period);

-- The threshold (0, 50, 80 or 100) that `used` has reached of `lim`.
CREATE FUNCTION tollway_budget_level(used bigint, lim bigint) RETURNS smallint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN lim IS NULL OR lim <= 0 THEN 0
        WHEN used * 100 >= lim * 100 THEN 100
        WHEN used * 100 >= lim * 80 THEN 80
        WHEN used * 100 >= lim * 50 THEN 50
        ELSE 0 END::smallint
$$;

-- Take up to `want` micro-dollars of one budget for one worker, atomically,
-- under the counter's row lock (the ledger locks counters before leases too).
-- A grant is at most 1/8 of what is left and at least `need` (one request's
-- maximum cost), or nothing when less than `need` is left. A changed limit
-- re-arms the alerts from the level already reached under the new limit.
CREATE FUNCTION tollway_take_budget_lease(
    p_worker text, p_subject text, p_span text, p_period date,
    want bigint, need bigint, lim bigint,
    OUT got bigint, OUT left_micros bigint)
LANGUAGE plpgsql AS $$
DECLARE
    used bigint; old_limit bigint; held bigint;
BEGIN
    INSERT INTO budget_counters (subject, span, period) VALUES (p_subject, p_span, p_period)
        ON CONFLICT DO NOTHING;
    SELECT used_micros, limit_micros INTO used, old_limit FROM budget_counters
        WHERE subject = p_subject AND span = p_span AND period = p_period FOR UPDATE;
    IF old_limit IS DISTINCT FROM lim THEN
        UPDATE budget_counters SET limit_micros = lim, alerted = tollway_budget_level(used, lim)
            WHERE subject = p_subject AND span = p_span AND period = p_period;
    END IF;
    SELECT coalesce(sum(greatest(micros, 0)), 0) INTO held FROM budget_leases
        WHERE subject = p_subject AND span = p_span AND period = p_period;
    left_micros := lim - used - held;
    got := CASE
        WHEN want <= 0 THEN 0
        WHEN left_micros < need THEN 0
        ELSE least(want, greatest(need, left_micros / 8)) END;
    IF got > 0 THEN
        INSERT INTO budget_leases AS l (worker_id, subject, span, period, micros)
            VALUES (p_worker, p_subject, p_span, p_period, got)
            ON CONFLICT (worker_id, subject, span, period) DO UPDATE
            SET micros = greatest(l.micros, 0) + excluded.micros, heartbeat_at = now();
    END IF;
    left_micros := left_micros - got;
END $$;

-- Daily rollups per tenant x key x model (public, and the provider model that
-- served), written in the same transaction as the usage rows they sum (only
-- newly inserted rows count), so they always agree with usage_events and
-- outlive its partitions. day is the UTC day the row was written (created_at).
CREATE TABLE usage_daily (
    day                date NOT NULL,
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
    PRIMARY KEY (day, tenant_id, key_id, public_model, provider, served_model)
);
CREATE INDEX usage_daily_tenant ON usage_daily (tenant_id, day);

-- Existing rows, once, so the rollups start complete.
INSERT INTO usage_daily
SELECT (e.created_at AT TIME ZONE 'UTC')::date, e.tenant_id, coalesce(e.key_id, ''),
       coalesce(e.public_model, ''), coalesce(e.provider, ''),
       coalesce(e.provider_model, e.public_model, ''),
       count(*), count(*) FILTER (WHERE e.status >= 400), count(*) FILTER (WHERE e.cached),
       sum(e.prompt_tokens), sum(e.completion_tokens),
       sum(CASE WHEN jsonb_typeof(e.details -> 'cached_tokens') = 'number'
                THEN (e.details ->> 'cached_tokens')::numeric::bigint ELSE 0 END),
       sum(CASE WHEN jsonb_typeof(e.details -> 'reasoning_tokens') = 'number'
                THEN (e.details ->> 'reasoning_tokens')::numeric::bigint ELSE 0 END),
       coalesce(sum(e.cost_usd), 0), count(*) FILTER (WHERE e.cost_usd IS NULL)
FROM usage_events e WHERE e.tenant_id IS NOT NULL
GROUP BY 1, 2, 3, 4, 5, 6;

-- Spend already settled counts against budgets from the start.
INSERT INTO budget_counters (subject, span, period, used_micros)
SELECT s.subject, s.span, s.period, sum(s.micros) FROM (
    SELECT x.subject, x.span, x.period, ceil(e.cost_usd * 1000000)::bigint AS micros
    FROM usage_events e
    CROSS JOIN LATERAL (VALUES
        ('t:' || e.tenant_id, 'month', e.period),
        ('t:' || e.tenant_id, 'day', (e.created_at AT TIME ZONE 'UTC')::date),
        ('k:' || e.key_id, 'month', e.period),
        ('k:' || e.key_id, 'day', (e.created_at AT TIME ZONE 'UTC')::date)
    ) AS x(subject, span, period)
    WHERE e.counted AND e.cost_usd > 0 AND e.tenant_id IS NOT NULL AND x.subject IS NOT NULL
) s GROUP BY 1, 2, 3;
