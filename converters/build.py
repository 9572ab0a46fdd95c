"""Building a bundle for one (model version, device profile).

Candidates are the profile's (runtime, precision) pairs in its order of preference: runtimes
in the order listed, and within each the profile's precisions that runtime supports. Each is
converted by its runtime's converter (``converters.registry``), loaded in its gate runtime and
run through the parity gate against the fp32 ONNX in onnxruntime; the first that passes is
bundled, and every earlier one is recorded with the reason it was rejected (the checks that
failed, with their numbers, or the converter's error). The bundle carries the artifact, the
parity report, self-test vectors computed with the compiled artifact, and a drift baseline. It
is written atomically: a failed build leaves nothing behind.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from converters import baseline as drift
from converters.converter import Artifact, ConversionJob, Converter, Log, Target, load_for_gate
from converters.data import (
    Dataset,
    batch_first,
    load_dataset,
    split_holdout,
    synthetic_dataset,
)
from converters.onnx.preprocess import preprocess_from_file
from converters.registry import converter, converters_for_build
from converters.validate import Outputs, Thresholds, compare, run_dataset
from edge_agent import __version__ as edgefleet_version
from edge_agent.bundle import BundleWriter, Manifest, ModelRef, RuntimeRequirement, SelfTestSpec
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.bundle.selftest import pack
from edge_agent.contracts.errors import ConversionError
from edge_agent.trust import Signature
from firmware_profiles import Profile

#: Signs the canonical manifest bytes; ``signing_key_id`` names the key it uses.
ManifestSigner = Callable[[bytes], Signature]
#: Validation samples generated when neither a calibration nor a validation set was uploaded.
SYNTHETIC_SAMPLES = 16


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    target: Target
    #: "runtime/precision: why it was not chosen", in the order tried.
    passed_over: list[str] = field(default_factory=list)
    #: Every candidate tried: runtime, precision, outcome, parity report or error.
    candidates: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class BuildOptions:
    #: Parity threshold overrides (name → value; None switches a check off).
    thresholds: dict[str, float | None] = field(default_factory=dict)
    #: Restrict to these runtimes (e.g. the ones the target devices have); None: all.
    runtimes: tuple[str, ...] | None = None
    #: Restrict to these precisions; None: the profile's.
    precisions: tuple[str, ...] | None = None
    #: Inputs that are state or configuration: kept in fp32 by quantization (not calibrated).
    #: None: the default, :func:`default_fp32_inputs`.
    fp32_inputs: tuple[str, ...] | None = None


def default_fp32_inputs(inputs: list[TensorSpec]) -> frozenset[str]:
    """Inputs that are not data: scalars, integer inputs, and inputs whose first axis is not
    the batch (a recurrent state ``[layers, batch, hidden]``)."""
    return frozenset(
        s.name for s in inputs if not s.shape or np.dtype(s.dtype).kind != "f" or not batch_first(s)
    )


def candidates(profile: Profile, options: BuildOptions | None = None) -> list[Target]:
    options = options or BuildOptions()
    out = []
    for runtime in profile.runtimes:
        if options.runtimes is not None and runtime.name not in options.runtimes:
            continue
        for precision in profile.precisions:
            if precision not in runtime.precisions:
                continue
            if options.precisions is not None and precision not in options.precisions:
                continue
            out.append(Target(runtime.name, precision, runtime.versions))
    if not out:
        raise ConversionError(
            f"profile {profile.name!r} offers no runtime/precision within the restriction "
            f"(runtimes {options.runtimes}, precisions {options.precisions})",
            reason="no_candidate",
            profile=profile.name,
        )
    return out


def prepare_datasets(
    inputs: list[TensorSpec], calibration: Path | None, validation: Path | None
) -> tuple[Dataset | None, Dataset]:
    calib = load_dataset(calibration, inputs, what="calibration") if calibration else None
    if validation is not None:
        valid = load_dataset(validation, inputs, what="validation")
    elif calib is not None:
        calib, valid = split_holdout(calib)
    else:
        valid = synthetic_dataset(inputs, SYNTHETIC_SAMPLES)
    return calib, valid


def build_bundle(
    *,
    out_path: Path,
    signer: ManifestSigner | None = None,
    signing_key_id: str | None = None,
    expires_at: datetime | None = None,
    **kwargs: Any,
) -> BuildResult:
    """:func:`compile_model` then :func:`write_bundle`, in a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        prepared = compile_model(work=Path(tmp), **kwargs)
        return write_bundle(
            prepared, out_path, signer=signer, signing_key_id=signing_key_id, expires_at=expires_at
        )


@dataclass
class Prepared:
    """A compiled, gated artifact and everything else the bundle holds, not yet signed."""

    #: (name inside the bundle, file) in bundle order.
    files: list[tuple[str, Path]]
    manifest: Manifest
    target: Target
    passed_over: list[str]
    candidates: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "files": [[n, str(p)] for n, p in self.files],
            "manifest": self.manifest.to_dict(),
            "target": self.target.__dict__,
            "passed_over": self.passed_over,
            "candidates": _json_safe(self.candidates),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prepared:
        return cls(
            files=[(n, Path(p)) for n, p in data["files"]],
            manifest=Manifest.from_dict(data["manifest"]),
            target=Target(**data["target"]),
            passed_over=list(data["passed_over"]),
            candidates=list(data["candidates"]),
        )


def write_bundle(
    prepared: Prepared,
    out_path: Path,
    *,
    signer: ManifestSigner | None = None,
    signing_key_id: str | None = None,
    expires_at: datetime | None = None,
) -> BuildResult:
    """Pack (and sign) a compiled model into a bundle at ``out_path``."""
    writer = BundleWriter()
    for arcname, path in prepared.files:
        writer.add_file(arcname, path)
    manifest = prepared.manifest.replace(
        files=writer.entries(),
        expires_at=expires_at,
        signing_key_id=signing_key_id if signer is not None else None,
    )
    signatures = [signer(manifest.to_canonical_json())] if signer is not None else None
    writer.write(out_path, manifest, signatures)
    return BuildResult(
        path=out_path,
        manifest=manifest,
        target=prepared.target,
        passed_over=prepared.passed_over,
        candidates=prepared.candidates,
    )


def compile_model(
    *,
    work: Path,
    source: Path,
    source_sha256: str,
    name: str,
    version: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    profile: Profile,
    calibration: Path | None = None,
    validation: Path | None = None,
    options: BuildOptions | None = None,
    log: Log | None = None,
    output_kinds: dict[str, str] | None = None,
) -> Prepared:
    """Convert, gate and self-test; the files it returns live in ``work``.

    Raises :class:`ConversionError` when the input is unusable or no candidate passes; its
    ``detail["candidates"]`` then holds every candidate's outcome.
    """
    options = options or BuildOptions()
    emit: Log = log or (lambda _line: None)
    _check_budget(source, profile)
    todo = candidates(profile, options)
    calib, valid = prepare_datasets(inputs, calibration, validation)
    emit(
        f"validation: {valid.samples} samples ({valid.origin}); calibration: "
        + (f"{calib.samples} samples" if calib else "none")
    )
    work.mkdir(parents=True, exist_ok=True)
    reference = _reference_outputs(source, valid)
    emit(f"reference (fp32 ONNX, onnxruntime): median {reference.median_ms:.2f} ms per call")

    unknown = sorted(set(options.fp32_inputs or ()) - {s.name for s in inputs})
    if unknown:
        raise ConversionError(
            f"fp32_inputs {unknown} name no input; the model's inputs are "
            f"{[s.name for s in inputs]}",
            reason="bad_options",
        )
    fp32 = (
        frozenset(options.fp32_inputs)
        if options.fp32_inputs is not None
        else default_fp32_inputs(inputs)
    )
    if fp32:
        emit(f"kept in fp32 by quantization (state or configuration): {sorted(fp32)}")
    feed_shapes = {k: tuple(int(d) for d in v.shape[1:]) for k, v in valid.arrays.items()}
    job = ConversionJob(
        source, work, profile, inputs, outputs, calib, emit, fp32, tuple(todo), feed_shapes
    )
    gated = _gate_candidates(job, todo, reference, valid, options, output_kinds or {})
    base_data = calib if calib is not None else valid
    files = _bundle_files(job, gated, valid, base_data, output_kinds or {})
    writer = BundleWriter()
    for arcname, path in files:
        writer.add_file(arcname, path)
    target = gated.target
    atol, rtol = gated.converters[target.runtime].selftest_tolerance[target.precision]
    manifest = Manifest(
        model=ModelRef(name=name, version=version, source_sha256=source_sha256),
        profile=profile.name,
        runtime=RuntimeRequirement(name=target.runtime, versions=target.versions),  # type: ignore[arg-type]
        precision=target.precision,  # type: ignore[arg-type]
        artifact="model/" + gated.artifact.path.name,
        files=writer.entries(),
        inputs=inputs,
        outputs=outputs,
        selftest=SelfTestSpec(file="selftest.npz", atol=atol, rtol=rtol),
        toolchain={**gated.artifact.toolchain, "edgefleet": edgefleet_version},
        parity=_json_safe(gated.parity_report()),
        created_at=datetime.now(UTC).replace(microsecond=0),
        preprocess=preprocess_from_file(source, inputs),
    )
    emit(f"compiled: {target.runtime}/{target.precision}")
    return Prepared(
        files=files,
        manifest=manifest,
        target=target,
        passed_over=gated.passed_over(),
        candidates=gated.tried,
    )


def _check_budget(source: Path, profile: Profile) -> None:
    size = source.stat().st_size
    if size > profile.resources.max_bundle_bytes:
        raise ConversionError(
            f"the model is {size} bytes, over the bundle budget of profile "
            f"{profile.name} ({profile.resources.max_bundle_bytes} bytes); use a smaller model "
            "or a profile with a larger budget",
            reason="over_budget",
            profile=profile.name,
        )


def _reference_outputs(source: Path, valid: Dataset) -> Outputs:
    """The fp32 ONNX model's outputs in onnxruntime: what every candidate must agree with."""
    model = load_for_gate("onnxruntime", source)
    try:
        return run_dataset(model, valid)
    except ConversionError as e:
        raise ConversionError(
            f"the original model does not run in onnxruntime on the validation set: {e.message}",
            reason="unsupported_model",
        ) from e
    finally:
        model.close()


@dataclass
class _Gated:
    """The outcome of trying a profile's candidates: the one chosen and every one tried."""

    target: Target
    artifact: Artifact
    report: dict[str, Any]
    outputs: Outputs
    tried: list[dict[str, Any]]
    converters: dict[str, Converter]

    def passed_over(self) -> list[str]:
        return _passed_over(self.tried)

    def parity_report(self) -> dict[str, Any]:
        return {
            "chosen": {
                "runtime": self.target.runtime,
                "precision": self.target.precision,
                **self.report,
            },
            "rejected": [
                {k: v for k, v in t.items() if k != "parity"}
                | ({"failed": t["parity"]["failed"]} if "parity" in t else {})
                for t in self.tried
                if t["outcome"] != "passed"
            ],
        }


def _passed_over(tried: list[dict[str, Any]]) -> list[str]:
    return [
        f"{t['runtime']}/{t['precision']}: "
        + (t["error"] if t["outcome"] == "error" else "; ".join(t["parity"]["failed"]))
        for t in tried
        if t["outcome"] != "passed"
    ]


def _gate_candidates(
    job: ConversionJob,
    todo: list[Target],
    reference: Outputs,
    valid: Dataset,
    options: BuildOptions,
    kinds: dict[str, str],
) -> _Gated:
    """Convert each candidate in turn and gate it against ``reference``; the first that passes
    is chosen. Each earlier one is recorded with why it was not."""
    converters = converters_for_build()
    tried: list[dict[str, Any]] = []
    source_size = job.source.stat().st_size
    budget = job.profile.resources.max_bundle_bytes
    for target in todo:
        label = f"{target.runtime}/{target.precision}"
        job.log(f"{label}: converting")
        start = time.monotonic()
        try:
            artifact = converter(converters, target.runtime).produce(target, job)
            thresholds = Thresholds(**job.profile.parity.for_precision(target.precision)).merged(
                options.thresholds
            )
            model = load_for_gate(artifact.gate_runtime, artifact.path)
            try:
                got = run_dataset(model, valid)
            finally:
                model.close()
            report = compare(
                reference,
                got,
                thresholds=thresholds,
                artifact=artifact.path,
                source_size=source_size,
                samples=valid.samples,
                origin=valid.origin,
                evaluated_in=artifact.evaluated_in,
                kinds=kinds,
            )
        except ConversionError as e:
            job.log(f"{label}: rejected: {e.message}")
            tried.append(
                {
                    "runtime": target.runtime,
                    "precision": target.precision,
                    "outcome": "error",
                    "reason": e.reason,
                    "error": e.message,
                    "seconds": round(time.monotonic() - start, 2),
                }
            )
            continue
        size = report["size_bytes"] + sum(p.stat().st_size for p in artifact.extra)
        if size > budget:
            report["passed"] = False
            report["failed"].append(f"size {size} bytes > the profile's budget {budget}")
        tried.append(
            {
                "runtime": target.runtime,
                "precision": target.precision,
                "outcome": "passed" if report["passed"] else "failed",
                "parity": report,
                "seconds": round(time.monotonic() - start, 2),
            }
        )
        summary = _summary(report)
        if report["passed"]:
            job.log(f"{label}: passed the parity gate ({summary})")
            return _Gated(target, artifact, report, got, tried, converters)
        job.log(f"{label}: failed the parity gate: {'; '.join(report['failed'])} ({summary})")
    passed_over = _passed_over(tried)
    raise ConversionError(
        f"no artifact for profile {job.profile.name!r} passed: " + " | ".join(passed_over),
        reason="no_artifact",
        profile=job.profile.name,
        candidates=tried,
    )


def _bundle_files(
    job: ConversionJob,
    gated: _Gated,
    valid: Dataset,
    base_data: Dataset,
    job_kinds: dict[str, str],
) -> list[tuple[str, Path]]:
    """The artifact, its extra files, the self-test vectors and the drift baseline."""
    # Self-test vectors: one real validation feed, expected outputs from the compiled artifact.
    feeds = {k: v[0] for k, v in valid.arrays.items()}
    expected = {k: v[0] for k, v in gated.outputs.arrays.items()}
    base_model = load_for_gate("onnxruntime", job.source)
    try:
        base_out = run_dataset(base_model, base_data, warmup=0)
    finally:
        base_model.close()
    base = drift.baseline(
        base_data.arrays, base_out.arrays, origin=base_data.origin, output_kinds=job_kinds
    )

    files: list[tuple[str, Path]] = [("model/" + gated.artifact.path.name, gated.artifact.path)]
    files += [("model/" + extra.name, extra) for extra in gated.artifact.extra]
    selftest_path = job.work / "selftest.npz"
    selftest_path.write_bytes(pack(feeds, expected))
    files.append(("selftest.npz", selftest_path))
    baseline_path = job.work / "baseline.json"
    baseline_path.write_text(json.dumps(_json_safe(base), sort_keys=True, separators=(",", ":")))
    files.append(("baseline.json", baseline_path))
    return files


def _summary(report: dict[str, Any]) -> str:
    parts = []
    if report.get("max_abs_error") is not None:
        parts.append(f"max abs {report['max_abs_error']:.3g}")
    if report.get("rel_l2_error") is not None:
        parts.append(f"rel L2 {report['rel_l2_error']:.3g}")
    if report.get("top1_agreement") is not None:
        parts.append(f"top-1 {report['top1_agreement']:.3f}")
    parts.append(f"{report['size_bytes'] / 1e6:.2f} MB")
    parts.append(f"{report['latency_ms_median']:.2f} ms")
    return ", ".join(parts)


def _json_safe(value: Any) -> Any:
    """Canonical JSON has no NaN/inf: such floats become strings."""
    if isinstance(value, float):
        return value if np.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
