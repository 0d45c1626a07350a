-- The Files and Batch APIs: uploaded files (content in Postgres, so every
-- instance reads what any instance stored), batches, and the durable queue of
-- their lines that any worker of any instance leases with SKIP LOCKED.

CREATE TABLE files (
    id          text PRIMARY KEY,                 -- file-<hex>
    tenant_id   bigint NOT NULL REFERENCES tenants(id),
    purpose     text NOT NULL,
    filename    text NOT NULL,
    bytes       bigint NOT NULL,
    content     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz                       -- retention: swept after this
);
CREATE INDEX files_tenant ON files (tenant_id, created_at DESC, id DESC);
CREATE INDEX files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE batches (
    id                text PRIMARY KEY,           -- batch_<hex>
    seq               bigserial NOT NULL UNIQUE,  -- creation order, for pagination
    tenant_id         bigint NOT NULL REFERENCES tenants(id),
    key_id            text NOT NULL,              -- the creator's key: each line runs as it
    endpoint          text NOT NULL,
    input_file_id     text NOT NULL,
    completion_window text NOT NULL,
    status            text NOT NULL CHECK (status IN ('validating', 'failed', 'in_progress',
                          'finalizing', 'completed', 'expired', 'cancelling', 'cancelled')),
    metadata          jsonb,
    errors            jsonb,
    output_file_id    text,
    error_file_id     text,
    total             integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    in_progress_at    timestamptz,
    expires_at        timestamptz NOT NULL,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    expired_at        timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz
);
CREATE INDEX batches_tenant ON batches (tenant_id, seq DESC);
CREATE INDEX batches_open ON batches (status) WHERE status IN ('in_progress', 'cancelling');

-- One row per input line. A worker leases a pending line (leased_until) and
-- writes its result line when done; a killed worker's lease runs out and the
-- line is leased again. not_before holds a line back (quota exhausted).
CREATE TABLE batch_lines (
    batch_id      text NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    line          integer NOT NULL,               -- 1-based line number in the input file
    tenant_id     bigint NOT NULL,
    custom_id     text NOT NULL,
    body          jsonb NOT NULL,
    state         text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'completed', 'failed', 'expired', 'cancelled')),
    not_before    timestamptz NOT NULL DEFAULT now(),
    leased_until  timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    result        jsonb,                          -- the output (or error) file's line
    done_at       timestamptz,
    PRIMARY KEY (batch_id, line),
    UNIQUE (batch_id, custom_id)
);
-- A claim walks a batch's pending lines in order and stops at its LIMIT.
CREATE INDEX batch_lines_pending ON batch_lines (batch_id, line) WHERE state = 'pending';
CREATE INDEX batch_lines_done ON batch_lines (done_at) WHERE done_at IS NOT NULL;
CREATE INDEX batch_lines_leased ON batch_lines (batch_id)
    WHERE state = 'pending' AND leased_until IS NOT NULL;
-- A batch's request_counts (completed, failed) and the expired check count
-- its lines by state: from this index alone, not from each line's row.
CREATE INDEX batch_lines_state ON batch_lines (batch_id, state);
