"""Build jobs: compiling a model version for a device profile, in a subprocess."""
