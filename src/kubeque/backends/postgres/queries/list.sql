-- Tasks in insertion order, optionally of one status; a NULL limit means all.
SELECT *
FROM {schema}.tasks
WHERE %(status)s::text IS NULL OR status = %(status)s::text
ORDER BY seq
LIMIT %(limit)s
