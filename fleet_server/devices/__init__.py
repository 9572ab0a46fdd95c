"""Devices: enrollment with one-time tokens, labels and profiles, what each device reports,
and the desired state the server holds for it."""
