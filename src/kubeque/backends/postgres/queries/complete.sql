-- Complete a batch; each row lands only if its attempt is still the one running.
UPDATE {schema}.tasks AS t
SET status = 'completed',
    result = c.result,
    worker = NULL,
    lease_expires_at = NULL,
    updated_at = now(),
    log = {schema}.close_log(t.log, 'completed', NULL)
FROM jsonb_to_recordset(%(done)s::jsonb) AS c(id text, attempt integer, result jsonb)
WHERE t.id = c.id
  AND t.attempt = c.attempt
  AND t.status = 'processing'
RETURNING t.id
