-- Tollway ledger, version 2: a quota lease never counts below zero.
--
-- Settling used to subtract a request's tokens from its lease even when the
-- lease held none for it (a tier without a token limit), so the lease went
-- negative and, after a change to a tier with a token limit, handed the
-- tokens already used back as headroom. Settling now stops at zero; this
-- mends leases written before that, and makes tollway_take_lease ignore a
-- negative lease (a worker still running the old code during an upgrade).

UPDATE quota_leases SET requests = greatest(requests, 0), tokens = greatest(tokens, 0)
    WHERE requests < 0 OR tokens < 0;

CREATE OR REPLACE FUNCTION tollway_take_lease(
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
    SELECT coalesce(sum(greatest(requests, 0)), 0), coalesce(sum(greatest(tokens, 0)), 0)
        INTO held_r, held_t
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
            SET requests = greatest(l.requests, 0) + excluded.requests,
                tokens = greatest(l.tokens, 0) + excluded.tokens,
                heartbeat_at = now();
    END IF;
    left_requests := left_requests - got_requests;
    left_tokens := left_tokens - got_tokens;
END $$;
