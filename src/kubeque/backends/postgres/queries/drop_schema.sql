-- Remove a queue and all its tasks: only on an explicit request (demo clean-up,
-- deletionPolicy Delete), never as part of a migration.
DROP SCHEMA IF EXISTS {schema} CASCADE
