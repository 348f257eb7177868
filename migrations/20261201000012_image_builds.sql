-- Images people ask the dashboard for (the images page's form): a target, the layer the
-- image ends with (core, base or a node type) and extra packages. `certo serve` builds it
-- and appends the build's events here as they happen, so the page follows the build and
-- any server shows it. A build whose server stopped (no heartbeat for a while) shows as
-- interrupted; asking again resumes from the cached layers.
CREATE TABLE image_builds (
    id            bigserial PRIMARY KEY,
    requested_by  text NOT NULL REFERENCES users (name),
    release       text NOT NULL,
    platform      text NOT NULL,
    top           text NOT NULL,
    packages      text[] NOT NULL DEFAULT '{}',
    formats       text[] NOT NULL DEFAULT '{}',
    state         text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'built', 'failed')),
    events        jsonb NOT NULL DEFAULT '[]',
    image_digest  text,
    error         text,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    CHECK ((state = 'running') = (finished_at IS NULL))
);
CREATE INDEX image_builds_recent ON image_builds (requested_at DESC);

-- The newest verdict: the dashboard's patch pages are rendered once per state of their
-- patch and of the verdicts (a last good run may change with any of them).
CREATE INDEX verdicts_decided ON verdicts (decided_at);
