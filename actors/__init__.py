"""Stage actors: one file per pipeline stage, each a callable class that Ray Data runs in an actor pool."""
