"""A pool of stream workers on Ray Serve: one pipeline per worker, one stream per worker at a time."""
