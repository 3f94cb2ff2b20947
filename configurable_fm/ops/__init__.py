"""The four brick operations, one package each: merge (and later grow, update, route)."""
