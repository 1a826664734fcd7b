-- Close one failed attempt: back to pending with a backoff while retries
-- remain (and the failure is not final), else failed. A task that stores no
-- max_retries (its handler was unknown where it was added) takes the worker's. Lands only if the
-- attempt is still the one running (and, for a reclaim, its lease has run out).
WITH landed AS (
    UPDATE {schema}.tasks AS t
    SET status = CASE WHEN NOT %(final)s AND t.retry_count < coalesce(t.max_retries, %(max_retries)s)
                      THEN 'pending' ELSE 'failed' END,
        retry_count = CASE WHEN NOT %(final)s AND t.retry_count < coalesce(t.max_retries, %(max_retries)s)
                           THEN t.retry_count + 1 ELSE t.retry_count END,
        run_at = CASE WHEN NOT %(final)s AND t.retry_count < coalesce(t.max_retries, %(max_retries)s)
                      THEN now() + %(retry_delay_ms)s * interval '1 millisecond' ELSE t.run_at END,
        worker = NULL,
        lease_expires_at = NULL,
        updated_at = now(),
        log = {schema}.close_log(t.log, %(outcome)s, %(error)s)
    WHERE t.id = %(id)s
      AND t.attempt = %(attempt)s
      AND t.status = 'processing'
      AND (NOT %(only_if_expired)s OR t.lease_expires_at <= now())
    RETURNING t.status
),
woke AS (
    SELECT pg_notify(%(channel)s, '') FROM landed WHERE status = 'pending'
)
SELECT landed.status FROM landed LEFT JOIN woke ON true
