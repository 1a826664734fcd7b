-- Try to become the only holder of one of this queue's chores (reclaiming,
-- pruning) for as long as this session holds the lock; never waits.
SELECT pg_try_advisory_lock(hashtextextended(%(key)s, 0)) AS locked
