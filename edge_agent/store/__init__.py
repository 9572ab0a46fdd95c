"""What the agent keeps on disk: bundle downloads (``download.py``) and the model store
(``models.py``). Durable single-file writes are a shared contract
(:mod:`edge_agent.contracts.durable`)."""
