-- Patch records as submitted, one row per (patch, revision).
CREATE TABLE patches (
    patch_id        BIGINT      NOT NULL CHECK (patch_id > 0),
    revision        INTEGER     NOT NULL CHECK (revision > 0),
    -- SHA-256 of the record's canonical JSON: the same content in any form has the same digest.
    content_sha256  TEXT        NOT NULL CHECK (content_sha256 ~ '^[0-9a-f]{64}$'),
    -- Certo's own lifecycle state (the tracker's status is kept apart, in tracker_status).
    state           TEXT        NOT NULL CHECK (state IN ('submitted', 'superseded')),
    title           TEXT        NOT NULL,
    tracker_status  TEXT        NOT NULL,
    release         TEXT        NOT NULL,
    platforms       TEXT[]      NOT NULL,
    node_types      TEXT[]      NOT NULL,
    submitter       TEXT        NOT NULL,
    record          JSONB       NOT NULL,
    source_file     TEXT        NOT NULL,
    source_format   TEXT        NOT NULL CHECK (source_format IN ('yaml', 'json', 'text')),
    submitted_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    superseded_at   TIMESTAMPTZ,
    superseded_by   INTEGER,
    PRIMARY KEY (patch_id, revision),
    CHECK ((state = 'superseded') = (superseded_by IS NOT NULL))
);

-- At most one revision of a patch is current.
CREATE UNIQUE INDEX patches_one_current ON patches (patch_id) WHERE state <> 'superseded';
CREATE INDEX patches_state ON patches (state, release);
CREATE INDEX patches_platforms ON patches USING gin (platforms);
CREATE INDEX patches_node_types ON patches USING gin (node_types);

CREATE TABLE patch_packages (
    patch_id     BIGINT  NOT NULL,
    revision     INTEGER NOT NULL,
    position     INTEGER NOT NULL,
    file_name    TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    pkg_release  TEXT    NOT NULL,
    arch         TEXT    NOT NULL,
    format       TEXT    NOT NULL CHECK (format IN ('rpm', 'deb')),
    source_kind  TEXT    NOT NULL CHECK (source_kind IN ('release', 'repository', 'url')),
    source       TEXT,
    sha256       TEXT    CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    PRIMARY KEY (patch_id, revision, position),
    UNIQUE (patch_id, revision, file_name),
    FOREIGN KEY (patch_id, revision) REFERENCES patches (patch_id, revision) ON DELETE CASCADE
);
CREATE INDEX patch_packages_name ON patch_packages (name);

CREATE TABLE patch_bugs (
    patch_id         BIGINT  NOT NULL,
    revision         INTEGER NOT NULL,
    bug_id           BIGINT  NOT NULL,
    title            TEXT,
    regression_test  TEXT,
    PRIMARY KEY (patch_id, revision, bug_id),
    FOREIGN KEY (patch_id, revision) REFERENCES patches (patch_id, revision) ON DELETE CASCADE
);
CREATE INDEX patch_bugs_bug ON patch_bugs (bug_id);

-- What happened to each patch, in order: the audit trail a certifier reads.
CREATE TABLE patch_events (
    id        BIGSERIAL   PRIMARY KEY,
    patch_id  BIGINT      NOT NULL,
    revision  INTEGER     NOT NULL,
    at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    kind      TEXT        NOT NULL,
    detail    JSONB       NOT NULL DEFAULT '{}'::jsonb,
    FOREIGN KEY (patch_id, revision) REFERENCES patches (patch_id, revision) ON DELETE CASCADE
);
CREATE INDEX patch_events_patch ON patch_events (patch_id, revision, id);
