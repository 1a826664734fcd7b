-- Hand taken tasks back to pending without spending a retry.
WITH released AS (
    UPDATE {schema}.tasks AS t
    SET status = 'pending',
        worker = NULL,
        lease_expires_at = NULL,
        updated_at = now(),
        log = {schema}.close_log(t.log, 'released', NULL)
    FROM unnest(%(ids)s::text[], %(attempts)s::integer[]) AS l(id, attempt)
    WHERE t.id = l.id
      AND t.attempt = l.attempt
      AND t.status = 'processing'
    RETURNING t.id
),
woke AS (
    SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM released)
)
SELECT released.id FROM released LEFT JOIN woke ON true
