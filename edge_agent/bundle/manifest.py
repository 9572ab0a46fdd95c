"""The bundle manifest and its canonical JSON form.

Canonical JSON (sorted keys, no whitespace, UTF-8) makes the manifest's bytes a pure function
of its content, so a signature over those bytes (``manifest.sig``) is stable.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from edge_agent.contracts.canonical import canonical_json
from firmware_profiles import Precision, RuntimeName

FORMAT_VERSION: Literal[1] = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class FileEntry(_Strict):
    path: Annotated[str, AfterValidator(check_member_name)]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TensorSpec(_Strict):
    name: str
    #: numpy dtype name: float32, float16, int64, uint8, …
    dtype: str
    #: ints for fixed dimensions, a string (symbolic) or None for dynamic ones.
    shape: list[int | str | None]


class ModelRef(_Strict):
    name: str
    version: str
    #: sha256 of the ONNX file the operator uploaded; compiled artifacts trace back to it.
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RuntimeRequirement(_Strict):
    name: RuntimeName
    #: PEP 440 range the device's runtime version must satisfy.
    versions: str


class SelfTestSpec(_Strict):
    """Vectors the agent runs after loading, before it switches traffic to the model."""

    file: str
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class Manifest(_Strict):
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

    @model_validator(mode="after")
    def _named_files_are_members(self) -> Manifest:
        """Every path the manifest names is one of its listed (and so digest-checked)
        members: a signed manifest cannot point the runtime at a file outside the bundle."""
        listed = {f.path for f in self.files}
        if len(listed) != len(self.files):
            raise ValueError("files lists a path twice")
        for what, path in (("artifact", self.artifact), ("selftest.file", self.selftest.file)):
            if path not in listed:
                raise ValueError(f"{what} {path!r} is not one of the listed files")
        return self

    def to_canonical_json(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)
