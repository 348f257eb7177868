-- Whose fault a VM run's unsuccessful end is: the product's (the guest reported a failure,
-- a test failed, the patch's services hung or crashed the VM after it joined) or the
-- infrastructure's (the host could not boot it, the agent went silent, the guest never
-- joined). NULL for a run that passed or is still live.
ALTER TABLE vm_runs ADD COLUMN fault text CHECK (fault IN ('product', 'infrastructure'));
