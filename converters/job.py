"""Run one build in its own process: ``python -m converters.job SPEC.json``.

The fleet server starts this for each build job, so a converter that crashes, runs out of
memory or hangs takes down this process, never the server. Progress goes to stdout, one line
per event (the server streams it into the build's log). The outcome is written to
``result.json`` in the spec's work directory:

    {"ok": true, "prepared": {...}, "peak_rss_mb": ...}          (see converters.build.Prepared)
    {"ok": false, "error": {"reason", "message", "detail"}, ...}

Exit status: 0 built, 1 the build was refused (bad input, nothing passed the gate), 2 crash.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from converters.build import BuildOptions, compile_model
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.contracts.errors import ConversionError
from edge_agent.contracts.lifetime import die_with_parent
from firmware_profiles import Profile


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)  # Linux: KiB


def run(spec: dict[str, Any]) -> int:
    if os.environ.get("EDGEFLEET_BUILD_FAILPOINT") == "crash":
        # Test hook: die like a converter that segfaults, after some output.
        print("converting… (failpoint: about to crash)", flush=True)
        print("simulated converter crash", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
    work = Path(spec["work"])
    result_path = work / "result.json"

    def log(line: str) -> None:
        print(line, flush=True)

    outcome: dict[str, Any]
    status = 0
    try:
        prepared = compile_model(
            work=work / "build",
            source=Path(spec["source"]),
            source_sha256=spec["source_sha256"],
            name=spec["name"],
            version=spec["version"],
            inputs=[TensorSpec.from_dict(s) for s in spec["inputs"]],
            outputs=[TensorSpec.from_dict(s) for s in spec["outputs"]],
            profile=Profile.from_dict(spec["profile"]),
            calibration=Path(spec["calibration"]) if spec.get("calibration") else None,
            validation=Path(spec["validation"]) if spec.get("validation") else None,
            options=BuildOptions(
                thresholds=spec.get("thresholds") or {},
                runtimes=tuple(spec["runtimes"]) if spec.get("runtimes") is not None else None,
                precisions=tuple(spec["precisions"]) if spec.get("precisions") else None,
                fp32_inputs=(
                    tuple(spec["fp32_inputs"]) if spec.get("fp32_inputs") is not None else None
                ),
            ),
            log=log,
            output_kinds=spec.get("output_kinds") or {},
        )
        outcome = {"ok": True, "prepared": prepared.to_json()}
    except ConversionError as e:
        log(f"build refused: {e.message}")
        outcome = {
            "ok": False,
            "error": {"reason": e.reason, "message": e.message, "detail": e.fields},
        }
        status = 1
    outcome["peak_rss_mb"] = _peak_rss_mb()
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome, default=str))
    tmp.rename(result_path)
    return status


def main() -> None:
    die_with_parent()
    if len(sys.argv) != 2:
        print("usage: python -m converters.job SPEC.json", file=sys.stderr)
        sys.exit(2)
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        sys.exit(run(spec))
    except Exception:
        traceback.print_exc()
        sys.exit(2)


if __name__ == "__main__":
    main()
