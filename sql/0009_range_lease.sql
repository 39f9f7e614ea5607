-- The lease of the worker that claimed a range, in seconds: it heartbeats
-- at a quarter of it, and a claimer judges the range stale by it, not by its
-- own --lease (a second host started with a shorter lease must not take
-- ranges from healthy workers). NULL for ranges claimed before: the
-- claimer's lease, as before.
ALTER TABLE relinker_range ADD COLUMN IF NOT EXISTS lease_seconds double precision;
