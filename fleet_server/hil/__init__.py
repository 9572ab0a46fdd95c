"""Hardware-in-the-loop on the server: registered rigs and the HIL jobs that hold a rollout's
first stage until a rig's runner has passed the version (``tables``, ``service``, ``routes``).
The rig files themselves, the runner and the scenarios live in the ``hil`` package."""
