-- The live work only: each count reads a partial index (pending rows, leased
-- rows), so the cost does not grow with finished tasks.
SELECT
    (SELECT count(*) FROM {schema}.tasks WHERE status = 'pending') AS pending,
    (SELECT count(*) FROM {schema}.tasks WHERE status = 'processing') AS processing,
    (SELECT extract(epoch FROM now() - min(run_at))::float8
     FROM {schema}.tasks
     WHERE status = 'pending' AND run_at <= now()) AS oldest_pending_age_s
