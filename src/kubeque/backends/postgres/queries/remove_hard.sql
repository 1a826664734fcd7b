DELETE FROM {schema}.tasks WHERE id = %(id)s RETURNING id
