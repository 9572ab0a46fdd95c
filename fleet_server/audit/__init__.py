"""The audit log: who changed what, recorded in the same transaction as the change itself
(a refused or rolled-back operation leaves no entry)."""
