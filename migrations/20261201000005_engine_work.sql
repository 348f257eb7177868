-- What the engine's steps do to the world and what they decide.
--
-- Epochs come from one sequence, so a later claim of any step holds a higher epoch than
-- every earlier claim: a host agent that has seen epoch N for a VM slot refuses anything
-- older, whichever step it comes from.
CREATE SEQUENCE engine_epoch_seq;

ALTER TABLE engine_steps
    ADD COLUMN started_at   timestamptz,
    ADD COLUMN finished_at  timestamptz,
    ADD COLUMN host         text;

ALTER TABLE engine_runs
    ADD COLUMN priority          integer NOT NULL DEFAULT 0,
    ADD COLUMN cancel_reason     text,
    ADD COLUMN targets           text[] NOT NULL DEFAULT '{}',
    -- Patches in flight at submission that touch the same packages or node types on the
    -- same release and platform: [{patch, revision, run, platforms, packages, node_types}].
    ADD COLUMN conflicts         jsonb NOT NULL DEFAULT '[]';

-- An intent: written before a step acts on the world (boots a VM), under a key that names
-- the effect (the domain name: run, target, attempt). A worker recovering the step asks the
-- host about the key before acting again.
CREATE TABLE engine_intents (
    key             text PRIMARY KEY,
    step_id         bigint NOT NULL REFERENCES engine_steps (id) ON DELETE CASCADE,
    epoch           bigint NOT NULL,
    host            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX engine_intents_step ON engine_intents (step_id);

-- A VM slot held on a host for one target of a run, from placement to teardown.
CREATE TABLE engine_placements (
    id              bigserial PRIMARY KEY,
    run_id          bigint NOT NULL REFERENCES engine_runs (id) ON DELETE CASCADE,
    target          text NOT NULL,
    host            text NOT NULL REFERENCES hosts (name),
    placed_at       timestamptz NOT NULL DEFAULT now(),
    released_at     timestamptz
);
CREATE UNIQUE INDEX engine_placements_held ON engine_placements (run_id, target) WHERE released_at IS NULL;
CREATE INDEX engine_placements_host ON engine_placements (host) WHERE released_at IS NULL;

-- The verdict of a run: exactly one per run, written by its verdict step.
CREATE TABLE verdicts (
    run_id          bigint PRIMARY KEY REFERENCES engine_runs (id) ON DELETE CASCADE,
    patch_id        bigint,
    revision        integer,
    verdict         text NOT NULL CHECK (verdict IN ('certified', 'rejected', 'incomplete', 'cancelled')),
    stage           text,
    target          text,
    reason          text,
    detail          jsonb NOT NULL DEFAULT '{}',
    decided_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((verdict = 'rejected') = (stage IS NOT NULL))
);
CREATE INDEX verdicts_patch ON verdicts (patch_id, revision);

-- Test results of baseline images (no patch layer), per image digest: what verdicts compare
-- a patch's results against. Refreshed by the nightly sweeps.
CREATE TABLE baseline_results (
    image_digest    text NOT NULL CHECK (image_digest ~ '^[0-9a-f]{64}$'),
    suite           text NOT NULL,
    name            text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pass', 'fail', 'error')),
    output          text NOT NULL DEFAULT '',
    vm_name         text,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (image_digest, suite, name)
);

-- Hosts taken out of placement after repeated infrastructure failures.
ALTER TABLE hosts
    ADD COLUMN quarantined_at     timestamptz,
    ADD COLUMN quarantine_reason  text,
    -- Infrastructure failures since the host last passed a step: QUARANTINE_AFTER in a row
    -- quarantine it.
    ADD COLUMN infra_failures     integer NOT NULL DEFAULT 0;
