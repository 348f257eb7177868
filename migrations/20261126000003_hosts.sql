-- Hosts (hypervisor machines running `certo agent`), the VMs booted on them, what the guest
-- harness reported, and the testbed registry. Secrets are stored only as SHA-256 digests.

CREATE TABLE hosts (
    name            text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    token_sha256    text NOT NULL CHECK (token_sha256 ~ '^[0-9a-f]{64}$'),
    agent_url       text,
    libvirt_uri     text,
    slots           integer CHECK (slots >= 0),
    memory_mib      bigint CHECK (memory_mib >= 0),
    vcpus           integer CHECK (vcpus >= 0),
    registered_at   timestamptz,
    last_heartbeat  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vm_runs (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    host            text NOT NULL REFERENCES hosts (name),
    image           text NOT NULL,
    node_type       text NOT NULL,
    patch_id        bigint,
    patch_revision  integer,
    attempt         integer NOT NULL DEFAULT 1,
    suite           text NOT NULL CHECK (suite IN ('basic', 'regression', 'all')),
    -- booting → joined → done | failed | timed_out | crashed | lost
    state           text NOT NULL DEFAULT 'booting'
                    CHECK (state IN ('booting', 'joined', 'done', 'failed', 'timed_out', 'crashed', 'lost')),
    reason          text,
    hostname        text,
    token_sha256    text NOT NULL UNIQUE,
    token_used_up   boolean NOT NULL DEFAULT false,
    serial_log      text,
    deadline        timestamptz NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    joined_at       timestamptz,
    finished_at     timestamptz
);

CREATE TABLE vm_results (
    vm_id           bigint NOT NULL REFERENCES vm_runs (id) ON DELETE CASCADE,
    suite           text NOT NULL,
    name            text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pass', 'fail', 'error')),
    seconds         double precision NOT NULL,
    output          text NOT NULL,
    reported_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vm_id, suite, name)
);

-- The testbed registry: shared long-running services (slice NULL) and the services of each
-- patch's slice. A name is unique among the shared services and within a slice, and a slice
-- may not register a name or endpoint a shared service already has.
CREATE TABLE testbed_services (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL,
    node_type       text NOT NULL,
    endpoint        text NOT NULL,
    slice           text,
    owner_vm        bigint REFERENCES vm_runs (id) ON DELETE CASCADE,
    healthy         boolean NOT NULL DEFAULT true,
    health_detail   text,
    last_check      timestamptz,
    registered_at   timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX testbed_services_shared_name ON testbed_services (name) WHERE slice IS NULL;
CREATE UNIQUE INDEX testbed_services_slice_name ON testbed_services (slice, name, endpoint) WHERE slice IS NOT NULL;
