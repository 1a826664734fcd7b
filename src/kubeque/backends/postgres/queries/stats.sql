-- Counts by status, and how long the oldest due pending task has waited.
SELECT
    (SELECT coalesce(jsonb_object_agg(c.status, c.n), jsonb_build_object())
     FROM (SELECT status, count(*) AS n FROM {schema}.tasks GROUP BY status) AS c) AS counts,
    (SELECT extract(epoch FROM now() - min(run_at))::float8
     FROM {schema}.tasks
     WHERE status = 'pending' AND run_at <= now()) AS oldest_pending_age_s
