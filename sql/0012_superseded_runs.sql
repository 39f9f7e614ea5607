-- A copy run's ranges are inode numbers of the media it was planned over:
-- `relinker scan` of one of them replaces its inodes, and the run is
-- superseded (no command resumes it; the next copy plans what is left).
ALTER TABLE relinker_run DROP CONSTRAINT IF EXISTS relinker_run_status_check;
ALTER TABLE relinker_run ADD CONSTRAINT relinker_run_status_check
    CHECK (status IN ('open', 'done', 'superseded'));
