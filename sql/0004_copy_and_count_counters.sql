-- Counters for the modes beyond relink: copy writes by-hash files, count and
-- verify find links that are missing or point at another inode.
ALTER TABLE relinker_range ADD COLUMN IF NOT EXISTS links_missing bigint NOT NULL DEFAULT 0;
ALTER TABLE relinker_range ADD COLUMN IF NOT EXISTS files_copied bigint NOT NULL DEFAULT 0;
ALTER TABLE relinker_range ADD COLUMN IF NOT EXISTS bytes_copied bigint NOT NULL DEFAULT 0;
