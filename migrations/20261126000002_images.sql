-- Image layers and images built by the imager. The imager's cache directory is the
-- authority on what exists (a directory is published by one rename); these tables mirror
-- it for reports and record when each was last used, for `certo image gc`.

CREATE TABLE image_layers (
    digest        text PRIMARY KEY CHECK (digest ~ '^[0-9a-f]{64}$'),
    parent        text REFERENCES image_layers (digest),
    kind          text NOT NULL CHECK (kind IN ('core', 'base', 'node_type', 'patch')),
    backend       text NOT NULL,
    -- repositories (id, sha256 of metadata), packages (name, pinned version), config files
    inputs        jsonb NOT NULL,
    -- every package installed once this layer is applied: [name, version, arch]
    installed     jsonb NOT NULL,
    size_bytes    bigint NOT NULL CHECK (size_bytes >= 0),
    build_seconds double precision NOT NULL,
    state         text NOT NULL DEFAULT 'ready' CHECK (state IN ('ready')),
    built_at      timestamptz NOT NULL,
    last_used_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX image_layers_parent ON image_layers (parent);

CREATE TABLE images (
    digest         text PRIMARY KEY CHECK (digest ~ '^[0-9a-f]{64}$'),
    top_layer      text NOT NULL REFERENCES image_layers (digest),
    layers         text[] NOT NULL,
    release        text NOT NULL,
    platform       text NOT NULL,
    node_type      text NOT NULL,
    patch_id       bigint,
    patch_revision integer,
    artefacts      jsonb NOT NULL,
    size_bytes     bigint NOT NULL CHECK (size_bytes >= 0),
    export_seconds double precision NOT NULL,
    built_at       timestamptz NOT NULL,
    last_used_at   timestamptz NOT NULL DEFAULT now()
);

-- Builds that failed: not cache entries (nothing of them is kept), but the evidence a
-- certifier reads: which layer, package and phase, the exit status and the log tail.
CREATE TABLE image_build_failures (
    id             bigserial PRIMARY KEY,
    release        text NOT NULL,
    platform       text NOT NULL,
    node_type      text NOT NULL,
    patch_id       bigint,
    patch_revision integer,
    layer_kind     text,
    phase          text NOT NULL,
    package        text,
    exit_status    integer,
    message        text NOT NULL,
    log_tail       jsonb NOT NULL,
    failed_at      timestamptz NOT NULL DEFAULT now()
);
