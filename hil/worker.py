"""The HIL worker behind ``edgefleet hil runner``: on the machine wired to the bench, it takes
the server's HIL jobs for its rig one at a time, runs them (:class:`~hil.runner.HilRun`) and
posts the verdict with ``junit.xml`` and ``report.html``.

A job is claimed with a lease token; only that token's verdict is accepted. A rig that cannot
start (a missing tool, a power hook that fails) is a failed verdict with its reason, never a
pass. A worker that dies mid-job posts nothing, and the server fails the stage at the job's
deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet_server.client import ApiClient
from hil.lease import RigLock
from hil.report import write_reports
from hil.rigfile import RigSpec
from hil.runner import HilRun

__all__ = ["HilWorker"]

log = logging.getLogger(__name__)


class HilWorker:
    def __init__(
        self,
        api: ApiClient,
        server_url: str,
        rig: RigSpec,
        *,
        work_dir: Path,
        state_dir: Path,
        restart_broker: Callable[[], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.api = api
        self.server_url = server_url
        self.rig = rig
        self.work_dir = work_dir
        self.state_dir = state_dir
        self.restart_broker = restart_broker
        self.name = name or f"hil-runner@{socket.gethostname()}"

    def claim(self) -> tuple[dict[str, Any], str] | None:
        response = self.api._send(
            "POST", f"/v1/hil/rigs/{self.rig.name}/claim", json={"runner": self.name}
        )
        if response.status_code == 204:
            return None
        body = response.json()
        return body["job"], body["lease"]

    def run_once(self) -> dict[str, Any] | None:
        """Take one job if there is one, run it, post the verdict; returns the job as the
        server has it after the verdict (None: nothing to do)."""
        claimed = self.claim()
        if claimed is None:
            return None
        job, lease = claimed
        out = self.work_dir / job["id"]
        log.info("HIL job %s: %s %s on rig %s", job["id"], job["model"], job["version"],
                 self.rig.name)  # fmt: skip
        with RigLock(self.rig.name, f"HIL job {job['id']} for rollout {job['rollout_id']}"):
            run = HilRun(
                self.api,
                self.server_url,
                self.rig,
                model=job["model"],
                version=job["version"],
                scenarios=job.get("scenarios"),
                state_dir=self.state_dir,
                restart_broker=self.restart_broker,
                work_dir=out / "work",
            )
            result = run.run()
        paths = write_reports(result, out)
        with contextlib.ExitStack() as stack:
            answer: dict[str, Any] = self.api.post(
                f"/v1/hil/jobs/{job['id']}/verdict",
                data={
                    "lease": lease,
                    "passed": "true" if result.passed else "false",
                    "summary": json.dumps(result.summary()),
                },
                files={
                    "junit": ("junit.xml", stack.enter_context(paths["junit"].open("rb"))),
                    "report": ("report.html", stack.enter_context(paths["html"].open("rb"))),
                },
            )
        log.info("HIL job %s: %s", job["id"], "passed" if result.passed else "failed")
        return answer

    def serve(self, poll_s: float = 5.0, stop: Callable[[], bool] = lambda: False) -> None:
        while not stop():
            try:
                done = self.run_once()
            except Exception:
                log.exception("HIL worker: a job failed to run; retrying after %.0f s", poll_s)
                done = None
            if done is None:
                time.sleep(poll_s)
