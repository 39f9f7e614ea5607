-- The seed's schema change (add_hardlink_tracking.sql) plus expected_hardlinks,
-- which older catalogues lack. Each column is added only where it is missing:
-- even ADD COLUMN IF NOT EXISTS takes an ACCESS EXCLUSIVE lock on the table
-- (on a partitioned inode, on every partition), and a production catalogue
-- already has all three. On a partitioned table the column reaches every
-- partition.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = to_regclass('inode') AND attname = 'by_hash_created' AND NOT attisdropped) THEN
        ALTER TABLE inode ADD COLUMN by_hash_created boolean DEFAULT false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = to_regclass('blobs') AND attname = 'n_hardlinks' AND NOT attisdropped) THEN
        ALTER TABLE blobs ADD COLUMN n_hardlinks integer DEFAULT 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = to_regclass('blobs') AND attname = 'expected_hardlinks' AND NOT attisdropped) THEN
        ALTER TABLE blobs ADD COLUMN expected_hardlinks integer;
    END IF;
END
$$;
