-- Change only the fields present in the "fields" object (the updatable ones,
-- plus status and retry_count for a manual retry). Making a task that is not
-- pending pending again (a manual retry) makes it due now unless run_at is
-- given, and drops any worker's claim on it. A status change never lands on a
-- processing task (the guard is in the WHERE, so a task a worker took since the
-- caller looked keeps its running attempt); no row comes back then, and the
-- caller tells that apart from a missing id.
WITH f AS (
    SELECT %(fields)s::jsonb AS v
),
changed AS (
    UPDATE {schema}.tasks AS t
    SET payload = CASE WHEN f.v ? 'payload' THEN f.v -> 'payload' ELSE t.payload END,
        priority = CASE WHEN f.v ? 'priority' THEN (f.v ->> 'priority')::bigint ELSE t.priority END,
        max_retries = CASE WHEN f.v ? 'max_retries'
                           THEN (f.v ->> 'max_retries')::integer ELSE t.max_retries END,
        max_processing_time = CASE WHEN f.v ? 'max_processing_time'
                                   THEN (f.v ->> 'max_processing_time')::bigint
                                   ELSE t.max_processing_time END,
        retry_backoff_ms = CASE WHEN f.v ? 'retry_backoff_ms'
                                THEN (f.v ->> 'retry_backoff_ms')::bigint ELSE t.retry_backoff_ms END,
        extra = CASE WHEN f.v ? 'extra' THEN f.v -> 'extra' ELSE t.extra END,
        status = CASE WHEN f.v ? 'status' THEN f.v ->> 'status' ELSE t.status END,
        retry_count = CASE WHEN f.v ? 'retry_count'
                           THEN (f.v ->> 'retry_count')::integer ELSE t.retry_count END,
        run_at = CASE WHEN f.v ? 'run_at' THEN (f.v ->> 'run_at')::timestamptz
                      WHEN f.v ->> 'status' = 'pending' AND t.status <> 'pending' THEN now()
                      ELSE t.run_at END,
        worker = CASE WHEN f.v ->> 'status' = 'pending' AND t.status <> 'pending'
                      THEN NULL ELSE t.worker END,
        lease_expires_at = CASE WHEN f.v ->> 'status' = 'pending' AND t.status <> 'pending'
                                THEN NULL ELSE t.lease_expires_at END,
        updated_at = now()
    FROM f
    WHERE t.id = %(id)s
      AND NOT (f.v ? 'status' AND t.status = 'processing')
    RETURNING t.*
),
woke AS (
    SELECT pg_notify(%(channel)s, '') FROM changed WHERE changed.status = 'pending'
)
SELECT changed.* FROM changed LEFT JOIN woke ON true
