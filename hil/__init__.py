"""Hardware-in-the-loop: rigs of real agent processes (on this host, or on real devices), the
scenarios run against them, and the runner. ``hil.rig`` drives agents on the local host (the
same processes ``edgefleet demo`` runs, from :mod:`fleet_server.demo.agents`); the end-to-end
tests and the benchmarks use it."""
