-- relinker_run_progress gained `working` (the time a run's ranges were
-- worked), which rates and ETAs are now computed from. Views are re-created
-- by every `relinker migrate` (views.sql); this numbered step only makes an
-- upgraded relinker ask for that migrate before it reads the new column.
SELECT 1;
