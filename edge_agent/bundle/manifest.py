"""The bundle manifest and its canonical JSON form.

Canonical JSON (sorted keys, no whitespace, UTF-8) makes the manifest's bytes a pure function
of its content, so a signature over those bytes (``manifest.sig``) is stable.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from msgspec import Meta

from edge_agent.contracts.canonical import canonical_json
from edge_agent.contracts.structs import Matching, Strict
from firmware_profiles import Precision, RuntimeName

FORMAT_VERSION: Literal[1] = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"


def check_member_name(name: str) -> str:
    """A bundle member's name: relative, "/"-separated, no "..", "." or empty parts, no
    backslash or NUL; returns it, or raises ValueError naming it."""
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(part in ("..", "", ".") for part in name.split("/"))
        or PurePosixPath(name).is_absolute()
    ):
        raise ValueError(f"unsafe path in bundle: {name!r}")
    return name


class FileEntry(Strict, frozen=True, kw_only=True):
    path: str
    sha256: Annotated[str, Matching(r"^[0-9a-f]{64}$")]
    size: Annotated[int, Meta(ge=0)]

    def __post_init__(self) -> None:
        check_member_name(self.path)


class TensorSpec(Strict, frozen=True, kw_only=True):
    name: str
    #: numpy dtype name: float32, float16, int64, uint8, …
    dtype: str
    #: ints for fixed dimensions, a string (symbolic) or None for dynamic ones.
    shape: list[int | str | None]


def check_image_input(preprocess: ImagePreprocess, spec: TensorSpec) -> None:
    """The image's shape fits the input's (its fixed dimensions, and its rank); raises
    ValueError naming the difference."""
    want = preprocess.input_shape()
    if len(spec.shape) != len(want):
        raise ValueError(
            f"input {spec.name!r} has shape {spec.shape}; a {preprocess.layout} image is "
            f"{list(want)}"
        )
    for got, need in zip(spec.shape[1:], want[1:], strict=True):
        if isinstance(got, int) and got != need:
            raise ValueError(
                f"input {spec.name!r} has shape {spec.shape}; the preprocessed image is "
                f"{list(want)} ({preprocess.layout}, {preprocess.channels}, size "
                f"{list(preprocess.size)})"
            )


class ModelRef(Strict, frozen=True, kw_only=True):
    name: str
    version: str
    #: sha256 of the ONNX file the operator uploaded; compiled artifacts trace back to it.
    source_sha256: Annotated[str, Matching(r"^[0-9a-f]{64}$")]


class RuntimeRequirement(Strict, frozen=True, kw_only=True):
    name: RuntimeName
    #: PEP 440 range the device's runtime version must satisfy.
    versions: str


class SelfTestSpec(Strict, frozen=True, kw_only=True):
    """Vectors the agent runs after loading, before it switches traffic to the model."""

    file: str
    atol: Annotated[float, Meta(ge=0)]
    rtol: Annotated[float, Meta(ge=0)]


#: The key of an ONNX model's ``metadata_props`` that carries its :class:`ImagePreprocess`
#: (JSON): builds copy it into the manifest (``edgefleet models annotate`` writes it).
PREPROCESS_METADATA_KEY = "edgefleet.preprocess"


class ImagePreprocess(Strict, frozen=True, kw_only=True):
    """How an image file becomes the model's input: decoded, converted to ``channels``,
    resized to ``size`` (height, width; bilinear), scaled (``x * scale``), normalized per
    channel (``(x - mean) / std``), laid out as ``layout`` with a batch axis of one, and cast
    to the input's dtype. What the model was trained on: it travels in the signed manifest, so
    the device scores images as the model expects them."""

    kind: Literal["image"] = "image"
    #: The input the image feeds.
    input: Annotated[str, Meta(min_length=1, max_length=256)]
    size: tuple[int, int]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR", "L"] = "RGB"
    scale: Annotated[float, Meta(gt=0)] = 1 / 255
    mean: Annotated[list[float], Meta(min_length=1, max_length=3)] | None = None
    std: Annotated[list[float], Meta(min_length=1, max_length=3)] | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, not {self.scale}")
        if not all(1 <= d <= 16384 for d in self.size):
            raise ValueError(f"size must be two dimensions of 1..16384 pixels, not {self.size}")
        depth = 1 if self.channels == "L" else 3
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, depth):
                raise ValueError(f"{name} has {len(values)} values; {self.channels} has {depth}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("std values must be above 0")

    @property
    def depth(self) -> int:
        return 1 if self.channels == "L" else 3

    def input_shape(self) -> tuple[int, ...]:
        """The input's shape for one image, batch axis included."""
        h, w = self.size
        return (1, self.depth, h, w) if self.layout == "NCHW" else (1, h, w, self.depth)


class Manifest(Strict, frozen=True, kw_only=True):
    format_version: Literal[1] = FORMAT_VERSION
    model: ModelRef
    profile: str
    runtime: RuntimeRequirement
    precision: Precision
    #: Path (inside the bundle) of the file the runtime loads.
    artifact: str
    files: list[FileEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    selftest: SelfTestSpec
    #: Name → version of every tool that produced the artifact.
    toolchain: dict[str, str]
    #: How the artifact compared with the original model (converters fill this in).
    parity: dict[str, Any] | None = None
    created_at: datetime
    expires_at: datetime | None = None
    #: Id of the online key that signed ``manifest.json``; None for an unsigned bundle.
    signing_key_id: str | None = None
    #: How image files become the model's input (``edge-agent score``); None: arrays only.
    preprocess: ImagePreprocess | None = None

    def __post_init__(self) -> None:
        """Every path the manifest names is one of its listed (and so digest-checked)
        members: a signed manifest cannot point the runtime at a file outside the bundle."""
        listed = {f.path for f in self.files}
        if len(listed) != len(self.files):
            raise ValueError("files lists a path twice")
        for what, path in (("artifact", self.artifact), ("selftest.file", self.selftest.file)):
            if path not in listed:
                raise ValueError(f"{what} {path!r} is not one of the listed files")
        if self.preprocess is not None:
            spec = next((s for s in self.inputs if s.name == self.preprocess.input), None)
            if spec is None:
                raise ValueError(
                    f"preprocess.input {self.preprocess.input!r} is not one of the inputs "
                    f"{[s.name for s in self.inputs]}"
                )
            check_image_input(self.preprocess, spec)

    def to_canonical_json(self) -> bytes:
        # A manifest without preprocessing has the bytes it had before the field existed:
        # agents that predate it accept it (their manifests forbid unknown fields).
        doc = self.to_dict()
        if self.preprocess is None:
            del doc["preprocess"]
        return canonical_json(doc)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)
