"""Hardware-in-the-loop: rigs of real agent processes (on this host, or on real devices), the
scenarios run against them, and the runner. ``hil.rig`` drives agents on the local host; it is
what ``edgefleet demo``, the end-to-end tests and the benchmarks use."""
