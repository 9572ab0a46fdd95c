"""The operator's dashboard at /ui (server-rendered pages, vendored static JavaScript)."""
