-- The tasks table of one queue, its indexes, and the helpers its queries use.
-- {schema} is filled with a quoted identifier; literal braces would need doubling.

CREATE TABLE {schema}.tasks (
    id                  text        PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    handler             text        NOT NULL CHECK (length(handler) BETWEEN 1 AND 255),
    payload             jsonb       NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    status              text        NOT NULL DEFAULT 'pending'
                                    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'deleted')),
    log                 jsonb       NOT NULL DEFAULT jsonb_build_array(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    max_retries         integer     NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    max_processing_time bigint      NOT NULL DEFAULT 600000 CHECK (max_processing_time > 0),
    retry_count         integer     NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    priority            bigint      NOT NULL DEFAULT 0,
    run_at              timestamptz NOT NULL DEFAULT now(),
    attempt             integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    worker              text,
    lease_expires_at    timestamptz,
    result              jsonb,
    retry_backoff_ms    bigint      NOT NULL DEFAULT 1000 CHECK (retry_backoff_ms >= 0),
    seq                 bigint      GENERATED ALWAYS AS IDENTITY,
    extra               jsonb       NOT NULL DEFAULT jsonb_build_object()
);

CREATE UNIQUE INDEX tasks_seq_idx ON {schema}.tasks (seq);

-- The dequeue scans this in queue order; finished rows are not in it, so its
-- size follows the waiting work, not the history.
CREATE INDEX tasks_pending_idx ON {schema}.tasks (priority DESC, run_at, seq)
    WHERE status = 'pending';

-- Reclaiming expired leases looks only at running tasks.
CREATE INDEX tasks_lease_idx ON {schema}.tasks (lease_expires_at)
    WHERE status = 'processing';

-- Pruning walks rows oldest first. Deliberately not led by status: an index
-- that could also answer "status = 'pending'" would compete with the one above.
CREATE INDEX tasks_updated_idx ON {schema}.tasks (updated_at);

-- The text Python's datetime.isoformat() gives for a UTC time, so log entries
-- read the same whichever backend wrote them.
CREATE FUNCTION {schema}.iso_utc(ts timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN extract(microseconds FROM ts)::bigint % 1000000 = 0 THEN ''
                ELSE to_char(ts AT TIME ZONE 'UTC', '.US') END
        || '+00:00'
$$;

-- Merge the end of an attempt (ended_at, outcome, error) into the last log entry.
CREATE FUNCTION {schema}.close_log(entries jsonb, outcome text, error_text text) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN jsonb_typeof(entries) = 'array' AND jsonb_array_length(entries) > 0 THEN
            jsonb_set(
                entries,
                ARRAY['-1'],
                (entries -> -1)
                    || jsonb_build_object('ended_at', {schema}.iso_utc(now()), 'outcome', outcome)
                    || CASE WHEN error_text IS NULL THEN jsonb_build_object()
                            ELSE jsonb_build_object('error', error_text) END
            )
        ELSE entries
    END
$$;
