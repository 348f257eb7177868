-- Scheduled workflows (the nightly sweep): each fire time of each schedule runs once.
--
-- `sweep_schedules` remembers since when a schedule is known: fire times before that were
-- never due (a new installation does not make up for the nights before it existed).
-- `sweep_fires` has one row per fire time that came: `fired` with the run it started, or
-- `skipped` (missed while no worker ran; the catch-up run covers them). Its primary key is
-- what makes a fire time run once however many workers look at it.
CREATE TABLE sweep_schedules (
    name        text PRIMARY KEY,
    cron        text NOT NULL,
    time_zone   text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sweep_fires (
    schedule     text NOT NULL REFERENCES sweep_schedules (name),
    fire_at      timestamptz NOT NULL,
    state        text NOT NULL CHECK (state IN ('fired', 'skipped')),
    run_id       bigint REFERENCES engine_runs (id),
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, fire_at),
    CHECK ((state = 'fired') = (run_id IS NOT NULL))
);
CREATE INDEX sweep_fires_run ON sweep_fires (run_id) WHERE run_id IS NOT NULL;

-- What a sweep found per cell (release/platform/node_type): whether its tests ran (or why
-- not), on which image, and each test's result. `flaky`: failed, then passed on a fresh VM.
CREATE TABLE sweep_cells (
    run_id        bigint NOT NULL REFERENCES engine_runs (id) ON DELETE CASCADE,
    cell          text NOT NULL,
    state         text NOT NULL CHECK (state IN ('ran', 'not run')),
    reason        text,
    image_digest  text,
    layers        jsonb NOT NULL DEFAULT '[]',
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    -- Set by the sweep's report: the cell's class, which outlives the results (retention).
    class         text,
    -- The test results were pruned (older than the retention); the summary stays.
    results_pruned boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, cell)
);

CREATE TABLE sweep_results (
    run_id   bigint NOT NULL,
    cell     text NOT NULL,
    suite    text NOT NULL,
    name     text NOT NULL,
    status   text NOT NULL CHECK (status IN ('pass', 'fail', 'flaky')),
    output   text NOT NULL DEFAULT '',
    -- Set by the sweep's report: against the previous sweep then (it stays when that one's
    -- results are pruned).
    class    text,
    PRIMARY KEY (run_id, cell, suite, name),
    FOREIGN KEY (run_id, cell) REFERENCES sweep_cells (run_id, cell) ON DELETE CASCADE
);
