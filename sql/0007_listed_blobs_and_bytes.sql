-- Ranges of a list of blobs (relink --from-file, verify --count or
-- --from-file) carry their blob IDs: a run's selection is fixed when it is
-- planned, so a resume works on exactly what was asked. Content work
-- (copy, verify --hash) counts the bytes it read, and copy plans the bytes
-- of each range: rates and ETAs over bytes. verify counts the blobs that
-- failed.
ALTER TABLE relinker_range ADD COLUMN IF NOT EXISTS blobids text[];
ALTER TABLE relinker_range ADD COLUMN IF NOT EXISTS bytes_planned bigint;
ALTER TABLE relinker_range ADD COLUMN IF NOT EXISTS bytes_read bigint NOT NULL DEFAULT 0;
ALTER TABLE relinker_range ADD COLUMN IF NOT EXISTS blobs_failed bigint NOT NULL DEFAULT 0;
