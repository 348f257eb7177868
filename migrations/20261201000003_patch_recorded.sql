-- A record whose tracker status is not "for certification" (not ready yet, already past
-- certification, rejected, obsolete) is stored and shown but not queued: state 'recorded'.
ALTER TABLE patches DROP CONSTRAINT patches_state_check;
ALTER TABLE patches ADD CONSTRAINT patches_state_check
    CHECK (state IN ('submitted', 'recorded', 'superseded'));
