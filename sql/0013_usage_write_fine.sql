-- Tollway ledger, version 13: a usage batch's rollups from one pass over its rows.
--
-- The four rollups (usage_daily, usage_monthly, usage_tenant_daily,
-- usage_model_daily) each joined the batch's rows with the rows it inserted
-- and summed them again: about 17 us of Postgres's CPU per usage row, of the
-- ~60 a billed request costs the database (bench/usage_write.py). Here the
-- inserted rows are summed once per tenant, key, public model, provider and
-- served model (`fine`), and every rollup is a sum of those groups: the same
-- sums, the same upserts in the same lock order. Everything else in
-- tollway_write_usage is as migration 0012 wrote it. The first statement is
-- the text ``proxy.stores.usage_batch`` makes from its columns (a test checks
-- they agree).
CREATE OR REPLACE FUNCTION tollway_write_usage(p_batch jsonb, p_keys text[])
RETURNS SETOF tollway_usage_out LANGUAGE plpgsql AS $fn$
DECLARE
    v_out tollway_usage_out[];
BEGIN
    WITH rows AS (
        SELECT (r->0->>0)::date AS period, r->0->>1 AS event_id, r->0->>2 AS request_id, (r->0->>3)::bigint AS tenant_id, r->0->>4 AS key_id, r->0->>5 AS worker_id, r->0->>6 AS endpoint, r->0->>7 AS public_model, r->0->>8 AS provider, r->0->>9 AS provider_model, (r->0->>10)::bigint AS prompt_tokens, (r->0->>11)::bigint AS completion_tokens, r->0->>12 AS usage_source, (r->0->>13)::bool AS counted, (r->0->>14)::bool AS cached, (r->0->>15)::bool AS stream, (r->0->>16)::bool AS client_disconnected, (r->0->>17)::int AS status, r->0->>18 AS error_code, (r->0->>19)::real AS latency_ms, (r->0->>20)::real AS ttft_ms, (r->0->>21)::int AS attempts, (r->0->>22)::numeric AS cost_usd, (r->0->>23)::jsonb AS details, r->0->>24 AS end_user, (r->0->>25)::jsonb AS tags, r->0->>26 AS client_ip, (r->>1)::bool AS leased, (r->>2)::date AS bday, (r->>3)::bool AS bleased FROM jsonb_array_elements(p_batch) AS e(r)
    ), ins AS (
        INSERT INTO usage_events (period, event_id, request_id, tenant_id, key_id, worker_id, endpoint, public_model, provider, provider_model, prompt_tokens, completion_tokens, usage_source, counted, cached, stream, client_disconnected, status, error_code, latency_ms, ttft_ms, attempts, cost_usd, details, end_user, tags, client_ip)
        SELECT period, event_id, request_id, tenant_id, key_id, worker_id, endpoint, public_model, provider, provider_model, prompt_tokens, completion_tokens, usage_source, counted, cached, stream, client_disconnected, status, error_code, latency_ms, ttft_ms, attempts, cost_usd, details, end_user, tags, client_ip FROM rows
        ON CONFLICT DO NOTHING
        RETURNING period, event_id
    ), agg AS (
        SELECT r.tenant_id, r.period, r.worker_id,
               count(*) AS n, sum(r.prompt_tokens + r.completion_tokens) AS t,
               count(*) FILTER (WHERE r.leased) AS ln,
               coalesce(sum(r.prompt_tokens + r.completion_tokens) FILTER (WHERE r.leased), 0) AS lt
        FROM rows r JOIN ins USING (period, event_id)
        WHERE r.counted AND r.tenant_id IS NOT NULL
        GROUP BY r.tenant_id, r.period, r.worker_id
    ), counters AS (
        INSERT INTO quota_counters AS q (tenant_id, period, requests_used, tokens_used)
        SELECT tenant_id, period, sum(n), sum(t) FROM agg
        GROUP BY tenant_id, period ORDER BY tenant_id, period
        ON CONFLICT (tenant_id, period) DO UPDATE
        SET requests_used = q.requests_used + excluded.requests_used,
            tokens_used = q.tokens_used + excluded.tokens_used
        RETURNING 1
    ), spend AS (
        SELECT x.subject, x.span, x.at AS period, r.worker_id, r.bleased,
               ceil(r.cost_usd * 1000000)::bigint AS micros
        FROM rows r JOIN ins USING (period, event_id)
        CROSS JOIN LATERAL (VALUES
            ('t:' || r.tenant_id, 'month', r.period),
            ('t:' || r.tenant_id, 'day', coalesce(r.bday, (now() AT TIME ZONE 'UTC')::date)),
            ('k:' || r.key_id, 'month', r.period),
            ('k:' || r.key_id, 'day', coalesce(r.bday, (now() AT TIME ZONE 'UTC')::date))
        ) AS x(subject, span, at)
        WHERE r.counted AND r.cost_usd > 0 AND r.tenant_id IS NOT NULL AND x.subject IS NOT NULL
    ), spent AS (
        INSERT INTO budget_counters AS b (subject, span, period, used_micros)
        SELECT subject, span, period, sum(micros) FROM spend
        GROUP BY subject, span, period ORDER BY subject, span, period
        ON CONFLICT (subject, span, period) DO UPDATE
        SET used_micros = b.used_micros + excluded.used_micros
        RETURNING subject, span, period, used_micros, limit_micros, alerted
    ), fine AS (
        SELECT r.tenant_id, coalesce(r.key_id, '') AS key_id,
               coalesce(r.public_model, '') AS public_model, coalesce(r.provider, '') AS provider,
               coalesce(r.provider_model, r.public_model, '') AS served_model,
               count(*) AS requests, count(*) FILTER (WHERE r.status >= 400) AS errors,
               count(*) FILTER (WHERE r.cached) AS cache_hits,
               sum(r.prompt_tokens) AS prompt_tokens, sum(r.completion_tokens) AS completion_tokens,
               sum(CASE WHEN jsonb_typeof(r.details -> 'cached_tokens') = 'number' THEN (r.details ->> 'cached_tokens')::numeric::bigint ELSE 0 END) AS cached_tokens,
               sum(CASE WHEN jsonb_typeof(r.details -> 'reasoning_tokens') = 'number' THEN (r.details ->> 'reasoning_tokens')::numeric::bigint ELSE 0 END) AS reasoning_tokens,
               coalesce(sum(r.cost_usd), 0) AS cost_usd,
               count(*) FILTER (WHERE r.cost_usd IS NULL) AS unpriced
        FROM rows r JOIN ins USING (period, event_id)
        WHERE r.tenant_id IS NOT NULL
        GROUP BY 1, 2, 3, 4, 5
    ), rolled AS (
        INSERT INTO usage_daily AS u (day, tenant_id, key_id, public_model, provider, served_model,
                                  requests, errors, cache_hits, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_usd, unpriced)
        SELECT (now() AT TIME ZONE 'UTC')::date, f.tenant_id, f.key_id, f.public_model, f.provider, f.served_model,
               f.requests, f.errors, f.cache_hits, f.prompt_tokens, f.completion_tokens, f.cached_tokens, f.reasoning_tokens, f.cost_usd, f.unpriced
        FROM fine f
        ORDER BY 1, 2, 3, 4, 5, 6
        ON CONFLICT (day, tenant_id, key_id, public_model, provider, served_model) DO UPDATE
        SET requests = u.requests + excluded.requests, errors = u.errors + excluded.errors, cache_hits = u.cache_hits + excluded.cache_hits, prompt_tokens = u.prompt_tokens + excluded.prompt_tokens, completion_tokens = u.completion_tokens + excluded.completion_tokens, cached_tokens = u.cached_tokens + excluded.cached_tokens, reasoning_tokens = u.reasoning_tokens + excluded.reasoning_tokens, cost_usd = u.cost_usd + excluded.cost_usd, unpriced = u.unpriced + excluded.unpriced
        RETURNING 1
    ), rolled_monthly AS (
        INSERT INTO usage_monthly AS u (month, tenant_id, key_id, public_model, provider, served_model,
                                  requests, errors, cache_hits, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_usd, unpriced)
        SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date, f.tenant_id, f.key_id, f.public_model, f.provider, f.served_model,
               f.requests, f.errors, f.cache_hits, f.prompt_tokens, f.completion_tokens, f.cached_tokens, f.reasoning_tokens, f.cost_usd, f.unpriced
        FROM fine f
        ORDER BY 1, 2, 3, 4, 5, 6
        ON CONFLICT (month, tenant_id, key_id, public_model, provider, served_model) DO UPDATE
        SET requests = u.requests + excluded.requests, errors = u.errors + excluded.errors, cache_hits = u.cache_hits + excluded.cache_hits, prompt_tokens = u.prompt_tokens + excluded.prompt_tokens, completion_tokens = u.completion_tokens + excluded.completion_tokens, cached_tokens = u.cached_tokens + excluded.cached_tokens, reasoning_tokens = u.reasoning_tokens + excluded.reasoning_tokens, cost_usd = u.cost_usd + excluded.cost_usd, unpriced = u.unpriced + excluded.unpriced
        RETURNING 1
    ), rolled_tenant AS (
        INSERT INTO usage_tenant_daily AS u (day, tenant_id, requests, errors, cache_hits, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_usd, unpriced)
        SELECT (now() AT TIME ZONE 'UTC')::date, f.tenant_id,
               sum(f.requests), sum(f.errors), sum(f.cache_hits), sum(f.prompt_tokens), sum(f.completion_tokens), sum(f.cached_tokens), sum(f.reasoning_tokens), sum(f.cost_usd), sum(f.unpriced)
        FROM fine f
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (tenant_id, day) DO UPDATE
        SET requests = u.requests + excluded.requests, errors = u.errors + excluded.errors, cache_hits = u.cache_hits + excluded.cache_hits, prompt_tokens = u.prompt_tokens + excluded.prompt_tokens, completion_tokens = u.completion_tokens + excluded.completion_tokens, cached_tokens = u.cached_tokens + excluded.cached_tokens, reasoning_tokens = u.reasoning_tokens + excluded.reasoning_tokens, cost_usd = u.cost_usd + excluded.cost_usd, unpriced = u.unpriced + excluded.unpriced
        RETURNING 1
    ), rolled_model AS (
        INSERT INTO usage_model_daily AS u (day, tenant_id, model, requests, errors, cache_hits, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_usd, unpriced)
        SELECT (now() AT TIME ZONE 'UTC')::date, f.tenant_id, m.model,
               sum(f.requests), sum(f.errors), sum(f.cache_hits), sum(f.prompt_tokens), sum(f.completion_tokens), sum(f.cached_tokens), sum(f.reasoning_tokens), sum(f.cost_usd), sum(f.unpriced)
        FROM fine f
        CROSS JOIN LATERAL (SELECT f.public_model UNION SELECT f.served_model) AS m(model)
        GROUP BY 1, 2, 3 ORDER BY 3, 2, 1
        ON CONFLICT (model, tenant_id, day) DO UPDATE
        SET requests = u.requests + excluded.requests, errors = u.errors + excluded.errors, cache_hits = u.cache_hits + excluded.cache_hits, prompt_tokens = u.prompt_tokens + excluded.prompt_tokens, completion_tokens = u.completion_tokens + excluded.completion_tokens, cached_tokens = u.cached_tokens + excluded.cached_tokens, reasoning_tokens = u.reasoning_tokens + excluded.reasoning_tokens, cost_usd = u.cost_usd + excluded.cost_usd, unpriced = u.unpriced + excluded.unpriced
        RETURNING 1
    ), result AS (
        SELECT 'q' AS kind, worker_id, tenant_id, NULL::text AS subject, NULL::text AS span, period,
               ln AS a, lt AS b, (SELECT count(*) FROM counters) + (SELECT count(*) FROM rolled)
               + (SELECT count(*) FROM rolled_monthly) + (SELECT count(*) FROM rolled_tenant)
               + (SELECT count(*) FROM rolled_model) AS c
        FROM agg WHERE ln > 0
        UNION ALL
        SELECT 'b', worker_id, NULL, subject, span, period, sum(micros), 0, 0
        FROM spend WHERE bleased GROUP BY worker_id, subject, span, period
        UNION ALL
        SELECT 'a', NULL, NULL, subject, span, period, used_micros, limit_micros, alerted
        FROM spent WHERE tollway_budget_level(used_micros, limit_micros) > alerted
    )
    SELECT coalesce(array_agg(ROW(x.kind, x.worker_id, x.tenant_id, x.subject, x.span,
                                  x.period, x.a, x.b, x.c)::tollway_usage_out), '{}')
    INTO v_out FROM result x;

    -- When each key was last used: key rows locked in id order, after the counters.
    PERFORM 1 FROM api_keys WHERE id = ANY(p_keys) ORDER BY id FOR UPDATE;
    UPDATE api_keys SET last_used_at = greatest(last_used_at, now()) WHERE id = ANY(p_keys);

    -- A lease never goes below zero: usage beyond what it held is in the
    -- counter already, and a negative lease would hand it back as headroom.
    UPDATE quota_leases l
    SET requests = greatest(0, l.requests - d.a::bigint),
        tokens = greatest(0, l.tokens - d.b::bigint)
    FROM unnest(v_out) d
    WHERE d.kind = 'q' AND l.worker_id = d.worker_id AND l.tenant_id = d.tenant_id
      AND l.period = d.period;
    UPDATE budget_leases l SET micros = greatest(0, l.micros - d.a::bigint)
    FROM unnest(v_out) d
    WHERE d.kind = 'b' AND l.worker_id = d.worker_id AND l.subject = d.subject
      AND l.span = d.span AND l.period = d.period;

    -- Each threshold is announced once: the counter row is locked by this transaction.
    UPDATE budget_counters b SET alerted = tollway_budget_level(b.used_micros, b.limit_micros)
    FROM unnest(v_out) d
    WHERE d.kind = 'a' AND b.subject = d.subject AND b.span = d.span AND b.period = d.period;

    RETURN QUERY SELECT * FROM unnest(v_out);
END
$fn$;
