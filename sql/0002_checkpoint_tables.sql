-- Checkpoint tables: one row per run, one per range of work, one per problem.
-- psql is a first-class interface to these; see views.sql and the README.

CREATE TABLE IF NOT EXISTS relinker_run (
    run_id       bigserial PRIMARY KEY,
    mode         text NOT NULL CHECK (mode IN ('relink', 'copy', 'count', 'verify')),
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    by_hash_root bytea,
    archive_root bytea,
    options      jsonb NOT NULL DEFAULT '{}',
    created_by   text
);

-- A range of work. For blob-keyed modes (relink, count) it covers
-- lo <= blobid < hi ('' and NULL mean unbounded); copy ranges cover inodes
-- (medium_hash, ino_lo <= ino < ino_hi).
CREATE TABLE IF NOT EXISTS relinker_range (
    run_id         bigint NOT NULL REFERENCES relinker_run ON DELETE CASCADE,
    range_no       integer NOT NULL,
    lo             text NOT NULL DEFAULT '',
    hi             text,
    medium_hash    text,
    ino_lo         bigint,
    ino_hi         bigint,
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'running', 'done', 'failed')),
    worker         text,
    attempts       integer NOT NULL DEFAULT 0,
    claimed_at     timestamptz,
    heartbeat_at   timestamptz,
    finished_at    timestamptz,
    blobs          bigint NOT NULL DEFAULT 0,
    links_created  bigint NOT NULL DEFAULT 0,
    links_present  bigint NOT NULL DEFAULT 0,
    links_replaced bigint NOT NULL DEFAULT 0,
    problems       bigint NOT NULL DEFAULT 0,
    last_error     text,
    PRIMARY KEY (run_id, range_no)
);

-- Claims look for open ranges of one run; done ranges are the bulk of a big run.
CREATE INDEX IF NOT EXISTS relinker_range_open_idx
    ON relinker_range (run_id, range_no) WHERE status <> 'done';

CREATE TABLE IF NOT EXISTS relinker_problem (
    problem_id bigserial PRIMARY KEY,
    run_id     bigint NOT NULL REFERENCES relinker_run ON DELETE CASCADE,
    range_no   integer,
    blobid     text,
    path       bytea,
    kind       text NOT NULL,
    detail     text,
    noted_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS relinker_problem_range_idx ON relinker_problem (run_id, range_no);
