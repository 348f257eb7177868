-- Verdict hooks: URLs that receive a JSON event when a run ends, signed with an HMAC of the
-- body under the hook's secret (the receiver holds the same secret, so it is kept here;
-- it never reaches a log or a command line). Removed hooks keep their rows and deliveries.
CREATE TABLE hooks (
    id          bigserial PRIMARY KEY,
    url         text NOT NULL CHECK (url ~ '^https?://' AND length(url) <= 2048),
    secret      text NOT NULL CHECK (length(secret) >= 16),
    created_at  timestamptz NOT NULL DEFAULT now(),
    removed_at  timestamptz
);

-- One row per hook and run that ended after the hook was added: pending until the
-- receiver answers 2xx (delivered), retried with backoff, failed after the last attempt.
-- `next_at` is also the lease of the server sending it (a second `certo serve` skips it).
CREATE TABLE hook_deliveries (
    hook_id       bigint NOT NULL REFERENCES hooks (id),
    run_id        bigint NOT NULL REFERENCES engine_runs (id) ON DELETE CASCADE,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    next_at       timestamptz NOT NULL DEFAULT now(),
    last_status   integer,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz,
    PRIMARY KEY (hook_id, run_id)
);
CREATE INDEX hook_deliveries_due ON hook_deliveries (next_at) WHERE state = 'pending';
