-- relinker: online
-- The indexes relinker's per-range queries need: blob -> inodes (covering the
-- inode's key and type, so the lookup never visits the inode heap) and
-- inode -> paths. Built CONCURRENTLY so a live catalogue keeps taking writes;
-- on a partitioned table `relinker migrate` builds each partition's index
-- concurrently and attaches it to an index created ON ONLY the parent
-- (PostgreSQL cannot build a partitioned index concurrently). An existing
-- index with the same leading columns (and the included ones) is reused.
CREATE INDEX CONCURRENTLY IF NOT EXISTS relinker_inode_blobid_idx ON inode (blobid) INCLUDE (medium_hash, ino, fs_type);
CREATE INDEX CONCURRENTLY IF NOT EXISTS relinker_path_inode_idx ON path (medium_hash, ino);
