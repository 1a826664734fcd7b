-- Take up to "limit" due pending tasks in queue order, in one statement.
-- The inner SELECT walks tasks_pending_idx in (priority DESC, run_at, seq)
-- order and skips rows other workers have locked, so concurrent dequeues never
-- take the same task and never wait for each other.
UPDATE {schema}.tasks AS t
SET status = 'processing',
    attempt = t.attempt + 1,
    worker = %(worker)s,
    lease_expires_at = now() + %(lease_ms)s * interval '1 millisecond',
    updated_at = now(),
    log = t.log || jsonb_build_array(jsonb_build_object(
        'attempt', t.attempt + 1,
        'worker', %(worker)s::text,
        'started_at', {schema}.iso_utc(now())))
WHERE t.id IN (
    SELECT p.id
    FROM {schema}.tasks AS p
    WHERE p.status = 'pending'
      AND p.run_at <= now()
      AND (%(handlers)s::text[] IS NULL OR p.handler = ANY (%(handlers)s::text[]))
    ORDER BY p.priority DESC, p.run_at, p.seq
    FOR UPDATE SKIP LOCKED
    LIMIT %(limit)s
)
RETURNING t.*
