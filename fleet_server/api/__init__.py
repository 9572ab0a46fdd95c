"""The HTTP seam every domain's routes stand on: dependency aliases and the caller's identity.
It imports no domain package (see ``deps.py``)."""
