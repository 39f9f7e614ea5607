-- Blobs a verify run found failing, until one passes: `verify --mode never`
-- and `--mode oldest` count a failed check as a check (last_checked is only
-- ever written for blobs that passed), so that a nightly `verify --count N`
-- moves on instead of picking the same failing blobs every night.
-- Also brings relinker_open_ranges' `held` and `at_work` (views.sql).
CREATE TABLE IF NOT EXISTS relinker_verify_failure (
    blobid    text PRIMARY KEY,
    run_id    bigint NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS relinker_verify_failure_at_idx ON relinker_verify_failure (failed_at, blobid);
