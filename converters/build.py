"""Building a bundle for one (model version, device profile).

Candidates are the profile's (runtime, precision) pairs in its order of preference: runtimes
in the order listed, and within each the profile's precisions that runtime supports. Each is
converted, loaded in its target runtime and run through the parity gate against the fp32 ONNX
in onnxruntime; the first that passes is bundled, and every earlier one is recorded with the
reason it was rejected (the checks that failed, with their numbers, or the converter's error).
The bundle carries the artifact, the parity report, self-test vectors computed with the
compiled artifact, and a drift baseline. It is written atomically: a failed build leaves
nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from converters import baseline as drift
from converters.data import Dataset, load_dataset, model_batch, split_holdout, synthetic_dataset
from converters.validate import Outputs, Thresholds, compare, run_dataset
from edge_agent import __version__ as edgefleet_version
from edge_agent.bundle import BundleWriter, Manifest, ModelRef, RuntimeRequirement, SelfTestSpec
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.bundle.selftest import pack
from edge_agent.contracts.errors import ConversionError, EdgefleetError
from edge_agent.runtimes import LoadOptions, get_runtime
from edge_agent.trust import Signature
from firmware_profiles import Profile

#: Signs the canonical manifest bytes; ``signing_key_id`` names the key it uses.
ManifestSigner = Callable[[bytes], Signature]
Log = Callable[[str], None]

#: Self-test tolerances (atol, rtol) per precision: fp32 kernels differ slightly between CPUs
#: (AVX2 vs AVX-512 vs NEON accumulate in different orders), quantized ones more.
SELFTEST_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 1e-2), "int8": (5e-2, 5e-2)}
#: Looser for TensorRT: the vectors come from the host proxy, the engine chooses its own
#: kernels (and fp16 accumulation) on the device.
SELFTEST_TOLERANCE_TENSORRT = {"fp32": (1e-3, 1e-2), "fp16": (5e-2, 5e-2), "int8": (1e-1, 1e-1)}
#: Validation samples generated when neither a calibration nor a validation set was uploaded.
SYNTHETIC_SAMPLES = 16
#: Self-test vectors stored in the bundle (samples of the validation set).
SELFTEST_SAMPLES = 2


@dataclass(frozen=True)
class Target:
    runtime: str
    precision: str
    versions: str


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


def choose_target(profile: Profile) -> tuple[Target, list[str]]:
    """The profile's first candidate (what a build tries first)."""
    return candidates(profile)[0], []


@dataclass
class _Artifact:
    path: Path
    toolchain: dict[str, str]
    #: Which runtime the parity gate ran it in.
    evaluated_in: str
    extra: list[Path] = field(default_factory=list)
    #: Runtime used for the gate and self-test vectors (differs from the target for TensorRT).
    gate_runtime: str = ""


class _Converters:
    """Produces artifacts for candidates, sharing work between them (one onnx2tf run yields
    both TFLite precisions)."""

    def __init__(
        self,
        source: Path,
        work: Path,
        profile: Profile,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        calibration: Dataset | None,
        log: Log,
    ) -> None:
        self.source, self.work, self.profile = source, work, profile
        self.inputs, self.outputs, self.calibration, self.log = inputs, outputs, calibration, log
        self._tflite: Any = None
        self._tflite_error: ConversionError | None = None

    def _versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}

    def produce(self, target: Target) -> _Artifact:
        key = f"{target.runtime}-{target.precision}"
        out_dir = self.work / key
        out_dir.mkdir(parents=True, exist_ok=True)
        batch = model_batch(self.inputs)
        if target.runtime == "onnxruntime":
            from converters.onnx.quantize import optimize_fp32, quantize_int8

            if target.precision == "fp32":
                path = optimize_fp32(self.source, out_dir / "model.onnx")
            elif target.precision == "int8":
                if self.calibration is None:
                    raise ConversionError(
                        "int8 needs a calibration set (upload one with the model version)",
                        reason="no_calibration",
                    )
                path = quantize_int8(
                    self.source,
                    out_dir / "model.onnx",
                    self.calibration,
                    flavour="x86",
                    batch=batch,
                )
            else:
                raise ConversionError(
                    f"onnxruntime {target.precision} is not built by edgefleet",
                    reason="no_converter",
                )
            return _Artifact(
                path, self._versions(), "onnxruntime (CPU)", gate_runtime="onnxruntime"
            )
        if target.runtime == "litert":
            return self._litert(target.precision)
        if target.runtime == "tensorrt":
            from converters.tensorrt import build_artifact

            path, recipe = build_artifact(
                self.source,
                out_dir,
                self.profile,
                target.precision,
                self.inputs,
                self.calibration,
                batch=batch,
            )
            return _Artifact(
                path,
                {**self._versions(), "tensorrt-recipe": "1"},
                "onnxruntime CPU (host proxy for TensorRT; the engine is built and checked "
                "against the self-test vectors on the device)",
                extra=[recipe],
                gate_runtime="onnxruntime",
            )
        raise ConversionError(f"no converter for {target.runtime}", reason="no_converter")

    def _litert(self, precision: str) -> _Artifact:
        from converters.tflite.convert import convert, custom_ops
        from converters.toolchains import locate

        if precision == "int8" and self.calibration is None:
            raise ConversionError(
                "int8 needs a calibration set (upload one with the model version)",
                reason="no_calibration",
            )
        if self._tflite_error is not None:
            raise self._tflite_error
        try:
            toolchain = locate("tflite")
            if self._tflite is None:
                start = time.monotonic()
                self._tflite = (
                    convert(
                        toolchain,
                        self.source,
                        self.work / "tflite",
                        self.inputs,
                        self.outputs,
                        self.calibration,
                        log=self.log,
                    ),
                    toolchain,
                )
                self.log(f"onnx2tf finished in {time.monotonic() - start:.1f} s")
        except ConversionError as e:
            self._tflite_error = e
            raise
        files, toolchain = self._tflite
        path = files.fp32 if precision == "fp32" else files.int8
        assert path is not None
        unsupported = custom_ops(path)
        if unsupported:
            raise ConversionError(
                f"the TFLite model contains operator(s) LiteRT cannot run: "
                f"{', '.join(unsupported)} (custom ops the converter could not lower; the "
                "ONNX model's control flow or a custom op is the usual cause)",
                reason="unsupported_operator",
                operators=unsupported,
            )
        final = self.work / f"litert-{precision}" / "model.tflite"
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, final)
        return _Artifact(
            final,
            {f"tflite-toolchain/{k}": v for k, v in toolchain.versions.items()},
            "LiteRT (ai-edge-litert)",
            gate_runtime="litert",
        )


def _load(runtime_name: str, path: Path) -> Any:
    runtime = get_runtime(runtime_name)
    if runtime.version() is None:
        raise ConversionError(
            f"the {runtime_name} runtime is not installed on the build host, so its artifact "
            "cannot be checked",
            reason="runtime_missing",
        )
    try:
        return runtime.load(path, LoadOptions(threads=1))
    except EdgefleetError as e:
        raise ConversionError(
            f"the artifact does not load in {runtime_name}: {e.message}",
            reason="artifact_unusable",
        ) from e


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
            "manifest": self.manifest.model_dump(mode="json"),
            "target": self.target.__dict__,
            "passed_over": self.passed_over,
            "candidates": _json_safe(self.candidates),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prepared:
        return cls(
            files=[(n, Path(p)) for n, p in data["files"]],
            manifest=Manifest.model_validate(data["manifest"]),
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
    manifest = prepared.manifest.model_copy(
        update={
            "files": writer.entries(),
            "expires_at": expires_at,
            "signing_key_id": signing_key_id if signer is not None else None,
        }
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
) -> Prepared:
    """Convert, gate and self-test; the files it returns live in ``work``.

    Raises :class:`ConversionError` when the input is unusable or no candidate passes; its
    ``detail["candidates"]`` then holds every candidate's outcome.
    """
    options = options or BuildOptions()
    emit: Log = log or (lambda _line: None)
    source_size = source.stat().st_size
    if source_size > profile.resources.max_bundle_bytes:
        raise ConversionError(
            f"the model is {source_size} bytes, over the bundle budget of profile "
            f"{profile.name} ({profile.resources.max_bundle_bytes} bytes); use a smaller model "
            "or a profile with a larger budget",
            reason="over_budget",
            profile=profile.name,
        )
    todo = candidates(profile, options)
    calib, valid = prepare_datasets(inputs, calibration, validation)
    emit(
        f"validation: {valid.samples} samples ({valid.origin}); calibration: "
        + (f"{calib.samples} samples" if calib else "none")
    )
    batch = model_batch(inputs)

    work.mkdir(parents=True, exist_ok=True)
    reference_model = _load("onnxruntime", source)
    try:
        reference = run_dataset(reference_model, valid, batch=batch)
    except ConversionError as e:
        raise ConversionError(
            f"the original model does not run in onnxruntime on the validation set: {e.message}",
            reason="unsupported_model",
        ) from e
    finally:
        reference_model.close()
    emit(f"reference (fp32 ONNX, onnxruntime): median {reference.median_ms:.2f} ms per call")

    converters = _Converters(source, work, profile, inputs, outputs, calib, emit)
    tried: list[dict[str, Any]] = []
    chosen: tuple[Target, _Artifact, dict[str, Any], Outputs] | None = None
    for target in todo:
        label = f"{target.runtime}/{target.precision}"
        emit(f"{label}: converting")
        start = time.monotonic()
        try:
            artifact = converters.produce(target)
            thresholds = Thresholds(**profile.parity.for_precision(target.precision)).merged(
                options.thresholds
            )
            model = _load(artifact.gate_runtime, artifact.path)
            try:
                got = run_dataset(model, valid, batch=batch)
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
            )
        except ConversionError as e:
            emit(f"{label}: rejected: {e.message}")
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
        if size > profile.resources.max_bundle_bytes:
            report["passed"] = False
            report["failed"].append(
                f"size {size} bytes > the profile's budget {profile.resources.max_bundle_bytes}"
            )
        entry = {
            "runtime": target.runtime,
            "precision": target.precision,
            "outcome": "passed" if report["passed"] else "failed",
            "parity": report,
            "seconds": round(time.monotonic() - start, 2),
        }
        tried.append(entry)
        summary = _summary(report)
        if report["passed"]:
            emit(f"{label}: passed the parity gate ({summary})")
            chosen = (target, artifact, report, got)
            break
        emit(f"{label}: failed the parity gate: {'; '.join(report['failed'])} ({summary})")

    passed_over = [
        f"{t['runtime']}/{t['precision']}: "
        + (t["error"] if t["outcome"] == "error" else "; ".join(t["parity"]["failed"]))
        for t in tried
        if t["outcome"] != "passed"
    ]
    if chosen is None:
        raise ConversionError(
            f"no artifact for profile {profile.name!r} passed: " + " | ".join(passed_over),
            reason="no_artifact",
            profile=profile.name,
            candidates=tried,
        )
    target, artifact, report, got = chosen

    # Self-test vectors: real validation samples, expected outputs from the compiled artifact.
    n = min(SELFTEST_SAMPLES * batch, valid.samples) // batch * batch or batch
    feeds = {k: v[:n] for k, v in valid.arrays.items()}
    expected = {k: v[:n] for k, v in got.arrays.items()}
    table = SELFTEST_TOLERANCE_TENSORRT if target.runtime == "tensorrt" else SELFTEST_TOLERANCE
    atol, rtol = table[target.precision]

    base_data = calib if calib is not None else valid
    base_model = _load("onnxruntime", source)
    try:
        base_out = run_dataset(base_model, base_data, batch=batch, warmup=0)
    finally:
        base_model.close()
    base = drift.baseline(base_data.arrays, base_out.arrays, origin=base_data.origin)

    artifact_name = "model/" + artifact.path.name
    files: list[tuple[str, Path]] = [(artifact_name, artifact.path)]
    files += [("model/" + extra.name, extra) for extra in artifact.extra]
    selftest_path = work / "selftest.npz"
    selftest_path.write_bytes(pack(feeds, expected))
    files.append(("selftest.npz", selftest_path))
    baseline_path = work / "baseline.json"
    baseline_path.write_text(json.dumps(_json_safe(base), sort_keys=True, separators=(",", ":")))
    files.append(("baseline.json", baseline_path))
    writer = BundleWriter()
    for arcname, path in files:
        writer.add_file(arcname, path)
    toolchain = dict(artifact.toolchain)
    toolchain["edgefleet"] = edgefleet_version
    parity = {
        "chosen": {"runtime": target.runtime, "precision": target.precision, **report},
        "rejected": [
            {k: v for k, v in t.items() if k != "parity"}
            | ({"failed": t["parity"]["failed"]} if "parity" in t else {})
            for t in tried
            if t["outcome"] != "passed"
        ],
    }
    manifest = Manifest(
        model=ModelRef(name=name, version=version, source_sha256=source_sha256),
        profile=profile.name,
        runtime=RuntimeRequirement(name=target.runtime, versions=target.versions),  # type: ignore[arg-type]
        precision=target.precision,  # type: ignore[arg-type]
        artifact=artifact_name,
        files=writer.entries(),
        inputs=inputs,
        outputs=outputs,
        selftest=SelfTestSpec(file="selftest.npz", atol=atol, rtol=rtol),
        toolchain=toolchain,
        parity=_json_safe(parity),
        created_at=datetime.now(UTC).replace(microsecond=0),
    )
    emit(f"compiled: {target.runtime}/{target.precision}")
    return Prepared(
        files=files, manifest=manifest, target=target, passed_over=passed_over, candidates=tried
    )


def _summary(report: dict[str, Any]) -> str:
    parts = [f"max abs {report['max_abs_error']:.3g}", f"rel L2 {report['rel_l2_error']:.3g}"]
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
