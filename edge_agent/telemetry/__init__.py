"""Fleet telemetry on the device: latency sketches, drift counts, the on-disk outbox.

- :mod:`~edge_agent.telemetry.sketch`: DDSketch latencies and their wire form (mergeable).
- :mod:`~edge_agent.telemetry.drift`: the bundle's baseline, counting inputs and outputs in
  its bins, PSI and Jensen-Shannon distance.
- :mod:`~edge_agent.telemetry.figures`: one serving model's figures for an interval, with
  the sampling that keeps their cost within budget.
- :mod:`~edge_agent.telemetry.outbox`: durable batches until the server acknowledges them.
- :mod:`~edge_agent.telemetry.reporter`: the thread that cuts, checkpoints and sends batches.
- :mod:`~edge_agent.telemetry.process`: CPU, RSS and temperature of the agent.
"""
