-- relinker: online
-- 0003's blob -> inode index covers the inode's key and type since relinker
-- first stored them in it; a catalogue an earlier relinker migrated has the
-- plain (blobid) index under 0003's name, and every range lookup then visits
-- the inode heap. Where 0003's index covers them this finds it and builds
-- nothing; elsewhere it builds the covering index beside the plain one (which
-- may then be dropped).
CREATE INDEX CONCURRENTLY IF NOT EXISTS relinker_inode_blobid_cover_idx ON inode (blobid) INCLUDE (medium_hash, ino, fs_type);
