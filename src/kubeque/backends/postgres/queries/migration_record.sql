INSERT INTO {schema}.migrations (version, name) VALUES (%(version)s, %(name)s)
