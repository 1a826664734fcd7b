-- Delete at most "limit" tasks of the given statuses untouched for
-- "older_than_ms", oldest first; callers repeat until it returns fewer.
DELETE FROM {schema}.tasks
WHERE id IN (
    SELECT id
    FROM {schema}.tasks
    WHERE status = ANY (%(statuses)s::text[])
      AND updated_at <= now() - %(older_than_ms)s * interval '1 millisecond'
    ORDER BY updated_at
    FOR UPDATE SKIP LOCKED
    LIMIT %(limit)s
)
