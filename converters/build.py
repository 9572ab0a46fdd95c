"""Building a bundle for one (model version, device profile).

The target is the first (runtime, precision) in the profile's order of preference that this
edgefleet can produce; every earlier candidate is recorded with the reason it was passed over.
The artifact is loaded in the target runtime on the build host, its self-test vectors are
computed there, and the bundle is written atomically: a failed build leaves no bundle behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from converters.selftest import synthetic_inputs
from edge_agent import __version__ as edgefleet_version
from edge_agent.bundle import BundleWriter, Manifest, ModelRef, RuntimeRequirement, SelfTestSpec
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.bundle.selftest import pack
from edge_agent.errors import ConversionError, EdgefleetError
from edge_agent.runtimes import LoadOptions, get_runtime
from edge_agent.trust import Signature
from firmware_profiles import Profile

#: Signs the canonical manifest bytes; ``signing_key_id`` names the key it uses.
ManifestSigner = Callable[[bytes], Signature]

#: A converter turns the source ONNX into an artifact file in ``work_dir`` and names the tools
#: it used (name → version).
Converter = Callable[[Path, Path], tuple[Path, dict[str, str]]]


def _onnx_passthrough(source: Path, work_dir: Path) -> tuple[Path, dict[str, str]]:
    """fp32 ONNX for onnxruntime: the uploaded model as is."""
    import onnx
    import onnxruntime

    out = work_dir / "model.onnx"
    shutil.copyfile(source, out)
    return out, {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


CONVERTERS: dict[tuple[str, str], Converter] = {
    ("onnxruntime", "fp32"): _onnx_passthrough,
}

#: Self-test tolerances per precision: fp32 kernels differ slightly between CPUs (AVX2 vs
#: AVX-512 vs NEON accumulate in different orders), quantized ones more.
SELFTEST_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 1e-2), "int8": (5e-2, 5e-2)}


@dataclass(frozen=True)
class Target:
    runtime: str
    precision: str
    versions: str


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    target: Target
    #: "runtime/precision: why it was not chosen", in the order tried.
    passed_over: list[str] = field(default_factory=list)


def choose_target(profile: Profile) -> tuple[Target, list[str]]:
    passed_over: list[str] = []
    for runtime in profile.runtimes:
        for precision in profile.precisions:
            if precision not in runtime.precisions:
                continue
            if (runtime.name, precision) in CONVERTERS:
                return Target(runtime.name, precision, runtime.versions), passed_over
            passed_over.append(f"{runtime.name}/{precision}: no converter for it in this build")
    raise ConversionError(
        f"no converter can build for profile {profile.name!r}; tried: " + "; ".join(passed_over),
        reason="no_converter",
        profile=profile.name,
    )


def build_bundle(
    *,
    source: Path,
    source_sha256: str,
    name: str,
    version: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    profile: Profile,
    out_path: Path,
    signer: ManifestSigner | None = None,
    signing_key_id: str | None = None,
    expires_at: datetime | None = None,
) -> BuildResult:
    """Build, self-test and write the bundle; sign its manifest when ``signer`` is given."""
    target, passed_over = choose_target(profile)
    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        work = Path(tmp)
        artifact, toolchain = CONVERTERS[(target.runtime, target.precision)](source, work)
        runtime = get_runtime(target.runtime)
        try:
            model = runtime.load(artifact, LoadOptions(threads=1))
            try:
                feeds = synthetic_inputs(model.inputs)
                results = model.run(feeds)
            finally:
                model.close()
        except EdgefleetError as e:
            raise ConversionError(
                f"the {target.runtime} artifact does not run on the build host: {e.message}",
                reason="artifact_unusable",
                profile=profile.name,
            ) from e

        atol, rtol = SELFTEST_TOLERANCE[target.precision]
        artifact_name = "model/" + artifact.name
        writer = BundleWriter()
        writer.add_file(artifact_name, artifact)
        writer.add_file("selftest.npz", pack(feeds, results))
        toolchain["edgefleet"] = edgefleet_version
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
            created_at=datetime.now(UTC).replace(microsecond=0),
            expires_at=expires_at,
            signing_key_id=signing_key_id if signer is not None else None,
        )
        total = sum(e.size for e in manifest.files)
        if total > profile.resources.max_bundle_bytes:
            raise ConversionError(
                f"artifact is {total} bytes, over profile {profile.name!r}'s budget of "
                f"{profile.resources.max_bundle_bytes} bytes",
                reason="over_budget",
                profile=profile.name,
            )
        signatures = [signer(manifest.to_canonical_json())] if signer is not None else None
        writer.write(out_path, manifest, signatures)
    return BuildResult(path=out_path, manifest=manifest, target=target, passed_over=passed_over)
