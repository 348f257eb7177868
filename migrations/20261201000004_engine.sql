-- The workflow engine's durable state: a run of a workflow (one patch revision), its steps
-- (one row per step of the run, per target for per-target steps), and what happened to them.
-- Workers claim runnable steps with FOR UPDATE SKIP LOCKED; each claim raises the step's
-- epoch, and every write of a step names the epoch it holds, so a worker whose lease expired
-- (and whose step another worker took over) changes nothing. Lease times are the database's.
CREATE TABLE engine_runs (
    id              bigserial PRIMARY KEY,
    workflow        text NOT NULL CHECK (workflow ~ '^[a-z][a-z0-9_-]{0,39}$'),
    patch_id        bigint,
    revision        integer,
    state           text NOT NULL DEFAULT 'running'
                    CHECK (state IN ('running', 'passed', 'failed', 'cancelled')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

CREATE TABLE engine_steps (
    id              bigserial PRIMARY KEY,
    run_id          bigint NOT NULL REFERENCES engine_runs (id) ON DELETE CASCADE,
    -- '' for a per-run step, else the target (release/platform/node_type).
    target          text NOT NULL DEFAULT '',
    name            text NOT NULL,
    -- waiting (for its needs) → runnable → running → passed | failed; cancelled.
    state           text NOT NULL
                    CHECK (state IN ('waiting', 'runnable', 'running', 'passed', 'failed', 'cancelled')),
    -- The steps that must pass first (an always-step: that must have ended, however).
    needs           bigint[] NOT NULL DEFAULT '{}',
    always          boolean NOT NULL DEFAULT false,
    attempt         integer NOT NULL DEFAULT 0,
    epoch           bigint NOT NULL DEFAULT 0,
    worker          text,
    lease_until     timestamptz,
    run_after       timestamptz NOT NULL DEFAULT now(),
    outcome         jsonb,
    UNIQUE (run_id, target, name)
);

CREATE INDEX engine_steps_claimable ON engine_steps (run_after, id) WHERE state IN ('runnable', 'running');
CREATE INDEX engine_steps_run ON engine_steps (run_id);

CREATE TABLE engine_events (
    id              bigserial PRIMARY KEY,
    step_id         bigint NOT NULL REFERENCES engine_steps (id) ON DELETE CASCADE,
    epoch           bigint NOT NULL,
    kind            text NOT NULL,
    detail          jsonb NOT NULL DEFAULT '{}',
    at              timestamptz NOT NULL DEFAULT clock_timestamp()
);
