"""The bundle catalogue telemetry reads with: each bundle's model, version and profile, and
the drift baseline it carries (``baseline.json``), cached per process (a bundle never changes
once built; one unknown a moment ago may have been built since)."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from edge_agent.contracts.errors import EdgefleetError
from edge_agent.telemetry.drift import Baseline
from fleet_server.artifacts import ArtifactStore
from fleet_server.bundles.tables import Bundle
from fleet_server.registry.tables import MLModel, ModelVersion

__all__ = ["BundleCatalog", "BundleInfo"]

log = logging.getLogger(__name__)

#: A baseline is a few histograms; a bigger one is not read into memory.
MAX_BASELINE_BYTES = 16 << 20


@dataclass(frozen=True)
class BundleInfo:
    sha256: str
    model: str
    version: str
    profile: str
    baseline: Baseline | None
    #: The baseline's tensors as ("inputs" | "outputs", name) → (kind, (groups, bins)): what
    #: each batch's counts are checked against, computed once.
    shapes: dict[tuple[str, str], tuple[str, tuple[int, int]]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        shapes = {}
        if self.baseline is not None:
            for side, tensors in (
                ("inputs", self.baseline.inputs),
                ("outputs", self.baseline.outputs),
            ):
                for name, tensor in tensors.items():
                    shapes[(side, name)] = (tensor.kind, tensor.shape)
        object.__setattr__(self, "shapes", shapes)


class BundleCatalog:
    """Bundle facts telemetry needs (model, version, profile, drift baseline), cached: a
    bundle never changes once built."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        self._cache: dict[str, BundleInfo | None] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, sha256: str) -> BundleInfo | None:
        with self._lock:
            if sha256 in self._cache:
                return self._cache[sha256]
        row = session.exec(
            select(Bundle.sha256, Bundle.profile, MLModel.name, ModelVersion.version)
            .join(ModelVersion, col(ModelVersion.id) == col(Bundle.model_version_id))
            .join(MLModel, col(MLModel.id) == col(ModelVersion.model_id))
            .where(Bundle.sha256 == sha256)
        ).first()
        info = None
        if row is not None:
            info = BundleInfo(row[0], row[2], row[3], row[1], self._baseline(sha256))
        with self._lock:
            if info is not None or len(self._cache) < 100_000:
                self._cache[sha256] = info
        return info

    def forget_unknown(self) -> None:
        """A bundle unknown a moment ago may have been built since."""
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if v is not None}

    def _baseline(self, sha256: str) -> Baseline | None:
        """The bundle's ``baseline.json``: from a local file by seeking past the model's bytes,
        from S3 as a stream, front to back (without a copy either way)."""
        try:
            with (
                self._store.open(sha256) as stream,
                tarfile.open(fileobj=stream, mode="r:" if stream.seekable() else "r|") as tar,
            ):
                for member in tar:
                    if member.name != "baseline.json" or not member.isfile():
                        continue
                    if member.size > MAX_BASELINE_BYTES:
                        raise ValueError(f"baseline.json is {member.size} bytes")
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file
                    return Baseline.from_json(json.load(io.BytesIO(f.read())))
            raise KeyError("the bundle has no baseline.json")
        except (EdgefleetError, OSError, KeyError, ValueError, tarfile.TarError) as e:
            log.warning("bundle %s: no usable drift baseline (%s)", sha256[:12], e)
            return None
