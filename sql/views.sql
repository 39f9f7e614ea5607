-- Views for psql users and for relinker itself. Re-created on every
-- `relinker migrate`, so they always match the current tables. Never CASCADE:
-- a view someone built on one of these is theirs (migrate stops and says so).

DROP VIEW IF EXISTS relinker_run_progress, relinker_open_ranges,
    relinker_problem_kinds, relinker_incomplete_blobs, relinker_path;

-- relinker_path: path rows with `path` as bytea whatever the catalogue's
-- shape. Older catalogues store path.path as text; convert_to() into the
-- database's own encoding returns the stored bytes unchanged.
DO $$
BEGIN
    -- `path` as every query here finds it (search_path), not as current_schema() names it
    IF (SELECT format_type(atttypid, NULL) FROM pg_attribute
        WHERE attrelid = to_regclass('path') AND attname = 'path' AND NOT attisdropped) = 'bytea' THEN
        EXECUTE 'CREATE VIEW relinker_path AS
                 SELECT medium_hash, ino, path, exclude_reason FROM path';
    ELSE
        EXECUTE 'CREATE VIEW relinker_path AS
                 SELECT medium_hash, ino, convert_to(path, getdatabaseencoding()) AS path,
                        exclude_reason FROM path';
    END IF;
END
$$;

-- Which ranges of a run are not done yet, who holds them, what went wrong.
-- `held`: a worker's session holds the range's advisory lock (a killed
-- worker's is gone at once); `at_work`: held, and its heartbeat younger than
-- its lease (a stuck worker holds it, and goes stale).
CREATE VIEW relinker_open_ranges AS
SELECT g.run_id, g.range_no, g.status, g.lo, g.hi, g.medium_hash, g.ino_lo, g.ino_hi,
       g.worker, g.attempts, g.claimed_at, g.heartbeat_at,
       -- a heartbeat committed after this statement's now() is no negative age; no heartbeat
       -- (never claimed, given back) none (greatest() would pass over the NULL)
       CASE WHEN g.heartbeat_at IS NOT NULL THEN greatest(now() - g.heartbeat_at, interval '0') END AS heartbeat_age,
       g.blobs, g.links_created, g.links_present, g.links_replaced, g.problems,
       g.links_missing, g.files_copied, g.bytes_copied, g.bytes_read, g.bytes_planned, g.blobs_failed,
       cardinality(g.blobids) AS listed_blobs, g.last_error, g.lease_seconds,
       held.held,
       g.status = 'running' AND held.held
           AND g.heartbeat_at >= now() - make_interval(secs => coalesce(g.lease_seconds, 120 /* relinker.checkpoint.DEFAULT_LEASE */)) AS at_work
FROM relinker_range g
CROSS JOIN LATERAL (
    SELECT g.status = 'running' AND EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = g.run_id::oid AND l.objid = g.range_no::oid) AS held
) AS held
WHERE g.status <> 'done'
  -- a run a scan superseded leaves its ranges to no one
  AND NOT EXISTS (SELECT 1 FROM relinker_run AS r WHERE r.run_id = g.run_id AND r.status = 'superseded');

-- How far is a run: ranges by status, counters summed over its ranges
-- (running ranges report their partial counters), rate and ETA. `working` is
-- the time some range of the run was being worked (the union of the ranges'
-- claimed..finished spans, claimed..last heartbeat while running,
-- claimed..given back for a range an interrupted worker gave back): a run
-- interrupted on Friday and resumed on Monday did not work over the weekend,
-- and its rate and ETA come from `working`, not from `elapsed`. No ETA while
-- no worker is at work (`at_work`: no range at work, see relinker_open_ranges,
-- none finished in the last 5 s, and the run planned more than 5 s ago).
CREATE VIEW relinker_run_progress AS
SELECT r.run_id,
       r.mode,
       r.status,
       r.started_at,
       r.finished_at,
       g.ranges_total,
       g.ranges_done,
       g.ranges_running,
       g.ranges_pending,
       g.ranges_failed,
       g.blobs,
       g.links_created,
       g.links_present,
       g.links_replaced,
       g.problems,
       g.links_missing,
       g.files_copied,
       g.bytes_copied,
       g.bytes_read,
       g.blobs_failed,
       g.bytes_planned,
       -- a run with nothing to do has no ranges, and is done all the same
       CASE WHEN r.status = 'done' THEN 100.0
            ELSE round(100.0 * g.ranges_done / greatest(g.ranges_total, 1), 1) END AS percent_done,
       coalesce(r.finished_at, now()) - r.started_at AS elapsed,
       coalesce(busy.working, interval '0') AS working,
       round((g.links_created + g.links_present + g.links_replaced)
             / greatest(extract(epoch FROM coalesce(busy.working, interval '0')), 0.001)::numeric,
             1) AS links_per_second,
       round(g.bytes_read / 1e6
             / greatest(extract(epoch FROM coalesce(busy.working, interval '0')), 0.001)::numeric,
             1) AS mb_per_second,
       -- the later of two estimates: by ranges (equal work each), and by
       -- bytes where the ranges' bytes were planned (copy: one large file
       -- makes one range far longer than the others)
       CASE WHEN r.status = 'done' THEN interval '0'
            -- nobody at work (interrupted, killed, stuck): no end in sight until it is resumed
            WHEN NOT live.at_work THEN NULL
            ELSE greatest(
                CASE WHEN g.ranges_done > 0
                     THEN coalesce(busy.working, interval '0') * (g.ranges_total - g.ranges_done) / g.ranges_done END,
                CASE WHEN g.bytes_planned > 0 AND g.bytes_read > 0
                     THEN coalesce(busy.working, interval '0')
                          * (greatest(g.bytes_planned - g.bytes_read, 0)::float8 / g.bytes_read)
                END)
       END AS eta,
       encode(r.by_hash_root, 'escape') AS by_hash_root,
       encode(r.archive_root, 'escape') AS archive_root,
       r.options,
       live.ranges_at_work,
       live.at_work
FROM relinker_run r
-- Each lateral is evaluated once per run, whatever the planner believes of
-- the run's ranges (a run newer than the table's statistics looks like one
-- range, and laterals joined to its ranges would run once per range).
CROSS JOIN LATERAL (
    SELECT count(*)                                   AS ranges_total,
           count(*) FILTER (WHERE w.status = 'done')    AS ranges_done,
           count(*) FILTER (WHERE w.status = 'running') AS ranges_running,
           count(*) FILTER (WHERE w.status = 'pending') AS ranges_pending,
           count(*) FILTER (WHERE w.status = 'failed')  AS ranges_failed,
           coalesce(sum(w.blobs), 0)::bigint          AS blobs,
           coalesce(sum(w.links_created), 0)::bigint  AS links_created,
           coalesce(sum(w.links_present), 0)::bigint  AS links_present,
           coalesce(sum(w.links_replaced), 0)::bigint AS links_replaced,
           coalesce(sum(w.problems), 0)::bigint       AS problems,
           coalesce(sum(w.links_missing), 0)::bigint  AS links_missing,
           coalesce(sum(w.files_copied), 0)::bigint   AS files_copied,
           coalesce(sum(w.bytes_copied), 0)::bigint   AS bytes_copied,
           coalesce(sum(w.bytes_read), 0)::bigint     AS bytes_read,
           coalesce(sum(w.blobs_failed), 0)::bigint   AS blobs_failed,
           sum(w.bytes_planned)::bigint               AS bytes_planned
    FROM relinker_range w
    WHERE w.run_id = r.run_id
) AS g
CROSS JOIN LATERAL (
    -- `at_work`: a range at work, a worker between two ranges (one finished a moment ago), or workers
    -- still starting in a run planned a moment ago
    SELECT at_work.ranges_at_work,
           r.status = 'open' AND (at_work.ranges_at_work > 0 OR r.started_at > now() - interval '5 seconds' OR EXISTS (
               SELECT 1 FROM relinker_range w
               WHERE w.run_id = r.run_id AND w.status = 'done'
                 AND w.finished_at > now() - interval '5 seconds')) AS at_work
    FROM (SELECT count(*) AS ranges_at_work FROM relinker_open_ranges o
          WHERE o.run_id = r.run_id AND o.at_work) AS at_work
) AS live
LEFT JOIN LATERAL (
    -- gaps and islands: a span starts an island unless an earlier span reaches past its start
    SELECT sum(island_end - island_start) AS working
    FROM (SELECT min(span_start) AS island_start, max(span_end) AS island_end
          FROM (SELECT span_start, span_end,
                       sum(CASE WHEN reached IS NULL OR span_start > reached THEN 1 ELSE 0 END)
                           OVER (ORDER BY span_start, span_end) AS island
                FROM (SELECT span_start, span_end,
                             max(span_end) OVER (ORDER BY span_start, span_end
                                                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reached
                      FROM (SELECT w.claimed_at AS span_start,
                                   CASE WHEN w.status = 'running' THEN greatest(w.heartbeat_at, w.claimed_at)
                                        ELSE w.finished_at END AS span_end
                            FROM relinker_range w
                            WHERE w.run_id = r.run_id AND w.claimed_at IS NOT NULL) AS spans
                      WHERE span_end IS NOT NULL) AS ordered) AS numbered
          GROUP BY island) AS islands
) AS busy ON true;

-- What broke, by kind, per run.
CREATE VIEW relinker_problem_kinds AS
SELECT run_id, kind, count(*) AS problems, min(noted_at) AS first_noted, max(noted_at) AS last_noted
FROM relinker_problem
GROUP BY run_id, kind;

-- Blobs whose archive links are known to be incomplete.
CREATE VIEW relinker_incomplete_blobs AS
SELECT blobid, n_hardlinks, expected_hardlinks, expected_hardlinks - coalesce(n_hardlinks, 0) AS missing
FROM blobs
WHERE coalesce(n_hardlinks, 0) < expected_hardlinks;
