-- The guest protocol's session: the VM token made for one boot is good for `join` alone;
-- join hands the harness a session key (stored only as its digest), which every later call
-- carries. A patch's code that finds the VM token afterwards can do nothing with it.
ALTER TABLE vm_runs ADD COLUMN session_sha256 text UNIQUE CHECK (session_sha256 ~ '^[0-9a-f]{64}$');

-- Evidence from outside the guest: a service the harness reports up is looked at by the
-- host's agent, through a forwarded port, before it is accepted. One row per report.
CREATE TABLE vm_service_probes (
    vm_id           bigint NOT NULL REFERENCES vm_runs (id) ON DELETE CASCADE,
    service         text NOT NULL,
    port            integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    -- NULL while the probe is pending.
    outcome         text CHECK (outcome IN ('answered', 'silent', 'unverifiable')),
    -- What the service said first (answered), or why there is no evidence.
    evidence        text,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    probed_at       timestamptz,
    PRIMARY KEY (vm_id, service, port)
);
