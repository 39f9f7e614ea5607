-- relinker_run_progress gained `at_work` (a worker between two ranges is at
-- work) and relinker_open_ranges no longer gives a heartbeat a negative age.
-- No table changes: `relinker migrate` re-creates the views after applying
-- migrations, and this number makes every command ask for that migrate
-- (status would otherwise read a column the old view lacks).
SELECT 1;
