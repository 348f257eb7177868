-- The guest harness's own log, streamed in chunks while it runs (the test outputs are in
-- vm_results; the serial console stays on the host).
CREATE TABLE vm_logs (
    vm_id       bigint NOT NULL REFERENCES vm_runs (id) ON DELETE CASCADE,
    seq         bigserial,
    chunk       text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vm_id, seq)
);
