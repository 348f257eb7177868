-- What the people's pages read most: a patch's runs (newest first), a workflow's runs (the
-- sweeps), the runs in flight (the queue). Without these each read scans every run.
CREATE INDEX engine_runs_patch ON engine_runs (patch_id, id DESC) WHERE patch_id IS NOT NULL;
CREATE INDEX engine_runs_workflow ON engine_runs (workflow, id DESC);
CREATE INDEX engine_runs_running ON engine_runs (id DESC) WHERE state = 'running';
