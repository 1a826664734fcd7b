-- Soft removal keeps the row (and its log) as deleted.
UPDATE {schema}.tasks
SET status = 'deleted', worker = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id = %(id)s
RETURNING id
