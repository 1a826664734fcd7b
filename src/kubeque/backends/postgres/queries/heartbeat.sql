-- Extend the leases this worker still holds on the attempts it names.
UPDATE {schema}.tasks AS t
SET lease_expires_at = now() + %(lease_ms)s * interval '1 millisecond'
FROM unnest(%(ids)s::text[], %(attempts)s::integer[]) AS l(id, attempt)
WHERE t.id = l.id
  AND t.attempt = l.attempt
  AND t.status = 'processing'
  AND t.worker = %(worker)s
RETURNING t.id
