-- Whether the schema has its migrations table (looked up by name, as data).
SELECT EXISTS (
    SELECT 1
    FROM pg_catalog.pg_class AS c
    JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
    WHERE n.nspname = %(schema)s AND c.relname = 'migrations' AND c.relkind IN ('r', 'p')
) AS present
