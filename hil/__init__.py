"""Hardware-in-the-loop: rig files (``rigs/``, :mod:`hil.rigfile`), rig device kinds behind one
interface (:mod:`hil.devices`: local, netns, ssh, qemu-aarch64), the runner's relay in every
device's path (:mod:`hil.relay`), scenarios as data plus small steps (:mod:`hil.scenario`,
:mod:`hil.builtin`), the runner (:mod:`hil.runner`) and its JUnit / HTML reports
(:mod:`hil.report`), the rig lock (:mod:`hil.lease`), the worker that takes a rollout's HIL
stage from the server (:mod:`hil.worker`) and the ``edgefleet hil`` commands (:mod:`hil.cli`).
``hil.rig`` drives agents on this host for the end-to-end tests and the benchmarks, and
``hil.simulator`` is the fleet simulator for scale tests."""
