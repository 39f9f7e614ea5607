-- NTT catalogue base tables, production shape (see README "The catalogue").
-- Applied by `relinker migrate --base` to a new, empty database; every
-- statement is idempotent so running it against an existing catalogue is a
-- no-op. inode and path are LIST-partitioned by medium_hash: `relinker scan`
-- creates one partition per medium, as the NTT loader does.

CREATE TABLE IF NOT EXISTS medium (
    medium_hash  text PRIMARY KEY,
    medium_human text,
    added_at     timestamptz DEFAULT now(),
    health       text,
    image_path   text,
    enum_done    timestamptz,
    copy_done    timestamptz
);

CREATE TABLE IF NOT EXISTS inode (
    medium_hash     text NOT NULL,
    dev             bigint,
    ino             bigint NOT NULL,
    nlink           integer,
    size            bigint,
    mtime           bigint,
    blobid          text,
    copied          boolean DEFAULT false,
    copied_to       text,
    errors          text[] DEFAULT '{}',
    fs_type         char(1),
    mime_type       varchar,
    processed_at    timestamptz,
    by_hash_created boolean DEFAULT false,
    claimed_by      text,
    claimed_at      timestamptz,
    PRIMARY KEY (medium_hash, ino)
) PARTITION BY LIST (medium_hash);

CREATE TABLE IF NOT EXISTS path (
    medium_hash    text NOT NULL,
    dev            bigint,
    ino            bigint NOT NULL,
    path           bytea NOT NULL,
    broken         boolean DEFAULT false,
    blobid         text,
    exclude_reason text,
    PRIMARY KEY (medium_hash, path)
) PARTITION BY LIST (medium_hash);

CREATE TABLE IF NOT EXISTS blobs (
    blobid             text PRIMARY KEY,
    last_checked       timestamptz,
    created_at         timestamptz DEFAULT now(),
    n_hardlinks        integer DEFAULT 0,
    expected_hardlinks integer
);
