-- Which of these ids are taken, first in the caller's order.
SELECT i.id
FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS i(id, ord)
JOIN {schema}.tasks AS t ON t.id = i.id
ORDER BY i.ord
LIMIT 1
