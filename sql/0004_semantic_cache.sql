-- Tollway, version 4: the semantic cache (proxy/stores/semantic_cache.py).
--
-- One row per cached answer. A lookup matches `scope` (t<tenant id>, or gw
-- without API keys) and `namespace` exactly: the sha256 of everything that
-- decides the answer except the last user message (model group, system
-- prompt, tools, response format, every earlier turn). Only the last user
-- message's embedding is compared, by cosine distance.
--
-- `embedding` has no fixed dimension, so one table serves every embedding
-- model; the HNSW index is a partial expression index per dimension count
-- (`(embedding::vector(N)) vector_cosine_ops WHERE dims = N`), created by the
-- gateway the first time it stores a vector of N dimensions. Rows past
-- `expires_at`, and each scope's oldest rows past its entry cap, are deleted
-- by a background sweeper.
--
-- A Postgres without pgvector (no `vector` in pg_available_extensions) still
-- migrates: the table is left out, every other feature works, and a
-- configured semantic cache logs that it cannot open and answers misses.
-- Installing pgvector later and running the SQL below by hand enables it.

DO $migrate$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
        RAISE NOTICE 'pgvector is not installed: the semantic cache table is not created';
        RETURN;
    END IF;
    CREATE EXTENSION IF NOT EXISTS vector;
    EXECUTE $sc$
CREATE TABLE semantic_cache (
    id                bigserial PRIMARY KEY,
    scope             text NOT NULL,
    model             text NOT NULL,          -- the public model (purge by model)
    namespace         bytea NOT NULL,
    dims              integer NOT NULL,
    embedding         vector NOT NULL,
    body              bytea NOT NULL,         -- the OpenAI response JSON, as first served
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    usage_source      text NOT NULL DEFAULT 'none',
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    hits              bigint NOT NULL DEFAULT 0,
    last_hit_at       timestamptz
)
    $sc$;
    EXECUTE $sc$
CREATE INDEX semantic_cache_namespace ON semantic_cache (scope, namespace)
    $sc$;
    EXECUTE $sc$
CREATE INDEX semantic_cache_age ON semantic_cache (scope, created_at)
    $sc$;
    EXECUTE $sc$
CREATE INDEX semantic_cache_expiry ON semantic_cache (expires_at)
    $sc$;
END
$migrate$;
