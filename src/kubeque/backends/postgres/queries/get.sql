SELECT * FROM {schema}.tasks WHERE id = %(id)s
