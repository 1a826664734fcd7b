-- Running tasks whose lease has run out: their workers died or stalled.
SELECT *
FROM {schema}.tasks
WHERE status = 'processing' AND lease_expires_at <= now()
ORDER BY seq
LIMIT %(limit)s
