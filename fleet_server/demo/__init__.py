"""``edgefleet demo``: the whole story on embedded defaults (``story.py``), with simulated
devices that are real agent processes on this host (``agents.py``)."""
