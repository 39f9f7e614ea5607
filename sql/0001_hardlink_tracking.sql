-- The seed's schema change (add_hardlink_tracking.sql) plus expected_hardlinks,
-- which older catalogues lack. ADD COLUMN IF NOT EXISTS keeps it idempotent;
-- on a partitioned table the column reaches every partition.
ALTER TABLE inode ADD COLUMN IF NOT EXISTS by_hash_created boolean DEFAULT false;
ALTER TABLE blobs ADD COLUMN IF NOT EXISTS n_hardlinks integer DEFAULT 0;
ALTER TABLE blobs ADD COLUMN IF NOT EXISTS expected_hardlinks integer;
