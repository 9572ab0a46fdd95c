"""Rollouts: putting a model version on a set of devices, and following it to completion."""
