-- Serialise migrators of one schema until this transaction ends.
SELECT pg_advisory_xact_lock(%(key)s)
