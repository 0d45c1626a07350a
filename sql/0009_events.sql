-- Tollway ledger, version 9: tenant job events, their webhooks and deliveries.
--
-- tenant_events is the durable event log behind GET /v1/events and the
-- webhooks. Its id is the resume cursor. Events of one tenant are written
-- one at a time (a transaction-scoped advisory lock on the tenant), so
-- within a tenant ids commit in increasing order: a reader that has seen id
-- N can never later find a smaller id of that tenant appearing.
CREATE TABLE tenant_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    event_id    text NOT NULL UNIQUE,          -- evt_...: the webhook's id and webhook-id
    type        text NOT NULL,
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_events_cursor ON tenant_events (tenant_id, id);
CREATE INDEX tenant_events_age ON tenant_events (created_at);   -- the retention sweep

-- A tenant's webhook endpoints, set through the CLI or the admin API. The
-- secret (whsec_...) signs each delivery; it is never listed back.
CREATE TABLE webhook_endpoints (
    id           text PRIMARY KEY,             -- we_...
    tenant_id    bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url          text NOT NULL,
    secret       text NOT NULL,
    event_types  text[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id);

-- One row per (event, endpoint) to deliver: written in the event's own
-- transaction, so a restart continues what is pending. A worker claims a
-- due row by pushing next_at past the attempt's timeout (a crashed worker's
-- claim expires by itself); state is pending, delivered or failed (every
-- attempt used).
CREATE TABLE webhook_deliveries (
    event_id      bigint NOT NULL REFERENCES tenant_events (id) ON DELETE CASCADE,
    endpoint_id   text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    next_at       timestamptz NOT NULL DEFAULT now(),
    last_status   integer,
    last_error    text,
    delivered_at  timestamptz,
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE state = 'pending';

-- Every attempt, as it ended: the HTTP status (NULL when none came back),
-- the error, and when the next attempt is due (NULL: none).
CREATE TABLE webhook_attempts (
    event_id      bigint NOT NULL,
    endpoint_id   text NOT NULL,
    attempt       integer NOT NULL,
    status_code   integer,
    error         text,
    attempted_at  timestamptz NOT NULL DEFAULT now(),
    next_at       timestamptz,
    delivered_at  timestamptz,
    PRIMARY KEY (event_id, endpoint_id, attempt),
    FOREIGN KEY (event_id, endpoint_id)
        REFERENCES webhook_deliveries (event_id, endpoint_id) ON DELETE CASCADE
);
