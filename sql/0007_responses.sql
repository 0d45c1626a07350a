-- Tollway, version 7: stored responses of the Responses API front door
-- (proxy/stores/responses.py, proxy/doors/responses.py).
--
-- One row per response created with `store` on (OpenAI's default). `scope`
-- is the owner (t<tenant id>, or gw without API keys): a lookup matches it
-- exactly, so another tenant's id is not found (and the same id kept by
-- two owners is two rows). `body` is the Response
-- object as served; `history` the conversation as chat messages (its input
-- and its output), which a later request's `previous_response_id` continues
-- from. Both are bytea, not jsonb: a provider's text may hold \u0000, which
-- jsonb refuses. Rows past `expires_at` are deleted by a background sweeper.

CREATE TABLE responses (
    id          text NOT NULL,
    scope       text NOT NULL,
    body        bytea NOT NULL,
    history     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    -- Per owner: a passed-through response keeps the provider's id, and two
    -- tenants on one upstream account must never shadow each other's rows.
    PRIMARY KEY (scope, id)
);

CREATE INDEX responses_expiry ON responses (expires_at);
