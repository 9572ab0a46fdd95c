"""A version explained: lineage, card, builds with their parity, where it runs, and two
versions side by side (``edgefleet models show NAME VERSION``, ``edgefleet models diff``)."""
