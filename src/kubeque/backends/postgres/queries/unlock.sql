-- Give up a chore lock taken with try_lock.
SELECT pg_advisory_unlock(hashtextextended(%(key)s, 0)) AS unlocked
