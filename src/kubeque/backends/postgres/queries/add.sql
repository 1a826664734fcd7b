-- Store a batch all or nothing, in list order (seq follows the array order).
-- If any id already exists nothing is inserted and no row comes back; the
-- caller then looks up which id clashed. Runs inside the caller's transaction
-- when given one, so the NOTIFY is delivered only when that commits.
WITH input AS (
    SELECT e.ord,
           e.value ->> 'id' AS id,
           e.value ->> 'handler' AS handler,
           e.value -> 'payload' AS payload,
           (e.value ->> 'max_retries')::integer AS max_retries,
           (e.value ->> 'max_processing_time')::bigint AS max_processing_time,
           (e.value ->> 'priority')::bigint AS priority,
           coalesce((e.value ->> 'run_at')::timestamptz,
                    now() + (e.value ->> 'delay_ms')::bigint * interval '1 millisecond') AS run_at,
           (e.value ->> 'retry_backoff_ms')::bigint AS retry_backoff_ms,
           e.value -> 'extra' AS extra
    FROM jsonb_array_elements(%(tasks)s::jsonb) WITH ORDINALITY AS e(value, ord)
),
clash AS (
    SELECT t.id FROM {schema}.tasks AS t WHERE t.id IN (SELECT id FROM input) LIMIT 1
),
ins AS (
    INSERT INTO {schema}.tasks (
        id, handler, payload, status, log, created_at, updated_at, max_retries,
        max_processing_time, retry_count, priority, run_at, attempt, retry_backoff_ms, extra)
    SELECT id, handler, payload, 'pending', jsonb_build_array(), now(), now(), max_retries,
           max_processing_time, 0, priority, run_at, 0, retry_backoff_ms, extra
    FROM input
    WHERE NOT EXISTS (SELECT 1 FROM clash)
    ORDER BY ord
    RETURNING *
),
woke AS (
    SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM ins)
)
SELECT ins.* FROM ins LEFT JOIN woke ON true
ORDER BY ins.seq
