-- Soft removal keeps the row (and its log) as deleted; an attempt running at
-- that moment is closed in the log as removed.
UPDATE {schema}.tasks
SET status = 'deleted',
    worker = NULL,
    lease_expires_at = NULL,
    updated_at = now(),
    log = CASE WHEN status = 'processing' THEN {schema}.close_log(log, 'removed', NULL) ELSE log END
WHERE id = %(id)s
RETURNING id
