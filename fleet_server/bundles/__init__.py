"""Bundles: the built, per-profile artifacts of a model version, stored by sha256 and served to
devices over HTTP (with Range, so an interrupted download can resume)."""
