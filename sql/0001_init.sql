-- Tollway ledger, version 1. Forward-only: later changes go in 0002_*.sql, ...
-- Every counter is bigint.

CREATE TABLE tenants (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    tier        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,                 -- key_<hex>, safe to show and log
    tenant_id   bigint NOT NULL REFERENCES tenants(id),
    name        text NOT NULL DEFAULT '',
    digest      bytea NOT NULL UNIQUE,            -- HMAC-SHA256(server secret, key)
    prefix      text NOT NULL,                    -- first characters, for display
    tier        text,                             -- overrides the tenant's tier when set
    state       text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'revoked')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    replaced_by text REFERENCES api_keys(id)
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- Settled usage per tenant and month.
CREATE TABLE quota_counters (
    tenant_id      bigint NOT NULL REFERENCES tenants(id),
    period         date NOT NULL,                 -- first day of the month (UTC)
    requests_used  bigint NOT NULL DEFAULT 0,
    tokens_used    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, period)
);

-- Quota handed to a worker but not yet settled. A counter's headroom is
-- limit - used - sum(leases): admission never lets that go below zero.
CREATE TABLE quota_leases (
    worker_id     text NOT NULL,
    tenant_id     bigint NOT NULL REFERENCES tenants(id),
    period        date NOT NULL,
    requests      bigint NOT NULL DEFAULT 0,
    tokens        bigint NOT NULL DEFAULT 0,
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (worker_id, tenant_id, period)
);
CREATE INDEX quota_leases_counter ON quota_leases (tenant_id, period);

-- One row per request, unique by request id within its billing period, so a
-- retried or replayed write never double-bills.
CREATE TABLE usage_events (
    period             date NOT NULL,
    event_id           text NOT NULL,             -- server-made: the idempotency key
    request_id         text NOT NULL,             -- x-request-id, possibly the client's
    created_at         timestamptz NOT NULL DEFAULT now(),
    tenant_id          bigint,
    key_id             text,
    worker_id          text,
    endpoint           text NOT NULL,
    public_model       text,
    provider           text,
    provider_model     text,
    prompt_tokens      bigint NOT NULL DEFAULT 0,
    completion_tokens  bigint NOT NULL DEFAULT 0,
    usage_source       text NOT NULL DEFAULT 'none',
    counted            boolean NOT NULL,          -- counts against the quota
    cached             boolean NOT NULL DEFAULT false,
    stream             boolean NOT NULL DEFAULT false,
    client_disconnected boolean NOT NULL DEFAULT false,
    status             integer NOT NULL,
    error_code         text,
    latency_ms         real,
    ttft_ms            real,
    attempts           integer NOT NULL DEFAULT 0,
    cost_usd           numeric(18, 8) NOT NULL DEFAULT 0,
    details            jsonb,
    PRIMARY KEY (period, event_id)
) PARTITION BY RANGE (period);
CREATE INDEX usage_events_tenant ON usage_events (tenant_id, period);

-- Creates the monthly partitions from `first` for `months` months; called by
-- migrate and by every worker at start, so partitions exist ahead of time.
CREATE FUNCTION tollway_ensure_partitions(first date, months int) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m date;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        m := (date_trunc('month', first) + make_interval(months => i))::date;
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
            'usage_events_' || to_char(m, 'YYYY_MM'), m, (m + interval '1 month')::date);
    END LOOP;
END $$;

SELECT tollway_ensure_partitions((date_trunc('month', now()) - interval '1 month')::date, 15);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    before      jsonb,
    after       jsonb
);

-- Take up to want_* of a tenant's monthly quota for one worker, atomically.
-- Grants shrink as headroom nears zero (at most 1/8 of what is left, at least
-- one unit), so many workers cannot strand the last units in idle leases.
-- A NULL limit means unlimited. Returns what was granted and what is left.
CREATE FUNCTION tollway_take_lease(
    p_worker text, p_tenant bigint, p_period date,
    want_requests bigint, want_tokens bigint, min_tokens bigint,
    limit_requests bigint, limit_tokens bigint,
    OUT got_requests bigint, OUT got_tokens bigint,
    OUT left_requests bigint, OUT left_tokens bigint)
LANGUAGE plpgsql AS $$
DECLARE
    used_r bigint; used_t bigint; held_r bigint; held_t bigint;
BEGIN
    INSERT INTO quota_counters (tenant_id, period) VALUES (p_tenant, p_period)
        ON CONFLICT DO NOTHING;
    SELECT requests_used, tokens_used INTO used_r, used_t FROM quota_counters
        WHERE tenant_id = p_tenant AND period = p_period FOR UPDATE;
    SELECT coalesce(sum(requests), 0), coalesce(sum(tokens), 0) INTO held_r, held_t
        FROM quota_leases WHERE tenant_id = p_tenant AND period = p_period;
    left_requests := CASE WHEN limit_requests IS NULL THEN NULL
                          ELSE limit_requests - used_r - held_r END;
    left_tokens := CASE WHEN limit_tokens IS NULL THEN NULL
                        ELSE limit_tokens - used_t - held_t END;
    got_requests := CASE
        WHEN want_requests <= 0 THEN 0
        WHEN left_requests IS NULL THEN want_requests
        WHEN left_requests <= 0 THEN 0
        ELSE least(want_requests, greatest(1, left_requests / 8)) END;
    got_tokens := CASE
        WHEN want_tokens <= 0 THEN 0
        WHEN left_tokens IS NULL THEN want_tokens
        WHEN left_tokens < min_tokens THEN 0
        ELSE least(want_tokens, greatest(min_tokens, left_tokens / 8)) END;
    IF got_requests > 0 OR got_tokens > 0 THEN
        INSERT INTO quota_leases AS l (worker_id, tenant_id, period, requests, tokens)
            VALUES (p_worker, p_tenant, p_period, got_requests, got_tokens)
            ON CONFLICT (worker_id, tenant_id, period) DO UPDATE
            SET requests = l.requests + excluded.requests, tokens = l.tokens + excluded.tokens,
                heartbeat_at = now();
    END IF;
    left_requests := left_requests - got_requests;
    left_tokens := left_tokens - got_tokens;
END $$;
