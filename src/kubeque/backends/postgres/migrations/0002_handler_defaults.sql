-- Options not given when a task was added (where its handler was unknown) are
-- stored as NULL, so the handler's settings apply when the task runs.
ALTER TABLE {schema}.tasks
    ALTER COLUMN max_retries DROP NOT NULL,
    ALTER COLUMN max_retries DROP DEFAULT,
    ALTER COLUMN max_processing_time DROP NOT NULL,
    ALTER COLUMN max_processing_time DROP DEFAULT,
    ALTER COLUMN retry_backoff_ms DROP NOT NULL,
    ALTER COLUMN retry_backoff_ms DROP DEFAULT;
