-- Media that `relinker scan` catalogued: a tree catalogued where it lies,
-- whose paths are read as they are. Any other medium's paths are read only
-- under its mount: a relative-form path (`/etc/passwd`) of a medium that is
-- not mounted names a file of that medium, never one of the machine copy
-- runs on.
CREATE TABLE IF NOT EXISTS relinker_scanned_medium (
    medium_hash text PRIMARY KEY,
    root        bytea NOT NULL,
    scanned_at  timestamptz NOT NULL DEFAULT now()
);
