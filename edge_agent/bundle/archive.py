"""Writing and reading bundle tar files.

Writing is deterministic (sorted members, zero mtimes and owners, fixed modes), so the same
inputs give the same bundle sha256 and the artifact store can deduplicate by digest.

Reading never trusts the archive: members must be regular files with plain relative paths
(no absolute paths, ``..``, links or devices), each must be listed in the manifest and match
its size and sha256, and extraction writes only below the destination directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from edge_agent.bundle.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    check_member_name,
)
from edge_agent.contracts.canonical import parse_canonical, parse_json
from edge_agent.contracts.errors import BundleError
from edge_agent.trust.signing import Signature

_CHUNK = 1 << 20
#: A manifest is small; refuse to parse anything bigger as one.
MAX_MANIFEST_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class BundleWriter:
    """Collects files, then writes the bundle with a manifest that lists them."""

    def __init__(self) -> None:
        self._files: dict[str, Path | bytes] = {}
        self._entries: dict[str, FileEntry] = {}

    def add_file(self, arcname: str, source: Path | bytes) -> FileEntry:
        _check_member_name(arcname)
        if arcname == MANIFEST_NAME or arcname in self._files:
            raise ValueError(f"bundle member {arcname!r} added twice or reserved")
        if isinstance(source, bytes):
            entry = FileEntry(
                path=arcname, sha256=hashlib.sha256(source).hexdigest(), size=len(source)
            )
        else:
            entry = FileEntry(path=arcname, sha256=sha256_file(source), size=source.stat().st_size)
        self._files[arcname] = source
        self._entries[arcname] = entry
        return entry

    def entries(self) -> list[FileEntry]:
        return [self._entries[name] for name in sorted(self._entries)]

    def write(
        self, out: Path, manifest: Manifest, signatures: list[Signature] | None = None
    ) -> None:
        """Write atomically: the bundle appears at ``out`` complete or not at all.

        ``signatures`` (over ``manifest.to_canonical_json()``) go into ``manifest.sig``, the
        second member, so a reader can check them before looking at anything else.
        """
        if {e.path: e for e in manifest.files} != self._entries:
            raise ValueError("manifest.files must list exactly the files added to the bundle")
        tmp = out.with_name(out.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, MANIFEST_NAME, manifest.to_canonical_json())
            if signatures:
                sig_doc = {"signatures": [s.to_dict() for s in signatures]}
                _add_bytes(tar, SIGNATURE_NAME, json.dumps(sig_doc, sort_keys=True).encode())
            for name in sorted(self._files):
                src = self._files[name]
                if isinstance(src, bytes):
                    _add_bytes(tar, name, src)
                else:
                    with src.open("rb") as f:
                        tar.addfile(_tarinfo(name, self._entries[name].size), f)
        tmp.replace(out)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _check_member_name(name: str) -> None:
    try:
        check_member_name(name)
    except ValueError as e:
        raise BundleError(str(e), reason="unsafe_path", member=name) from None


#: Tar metadata records (pax headers, GNU long names) are read whole by ``tarfile`` before
#: anything else: no bundle of ours needs more than a few hundred bytes of them.
MAX_TAR_METADATA_BYTES = 64 << 10
#: More members than any bundle has (a model, its extra files, self-test, baseline).
MAX_MEMBERS = 4096
_BLOCK = 512
_METADATA_TYPES = frozenset(b"xgLK")


def _tar_number(field: bytes) -> int:
    """A tar header's numeric field: octal ASCII, or GNU base-256 (high bit set)."""
    if field and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def scan_tar_headers(f: IO[bytes], name: str) -> None:
    """Walk the archive's headers (seeking past member data) before ``tarfile`` parses it, so
    that oversized metadata or a flood of members is refused at the cost of reading a few
    headers, never by reading what they claim to hold."""
    start = f.tell()
    members = 0
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK or header == bytes(_BLOCK):
            break  # end of archive (or a short file: tarfile names that)
        try:
            size = _tar_number(header[124:136])
        except ValueError:
            raise BundleError(
                f"{name}: not a bundle (bad tar header)", reason="not_a_bundle"
            ) from None
        kind = header[156]
        if kind in _METADATA_TYPES and size > MAX_TAR_METADATA_BYTES:
            raise BundleError(
                f"{name}: a tar metadata record of {size} bytes (limit {MAX_TAR_METADATA_BYTES})",
                reason="tar_metadata_too_large",
            )
        members += 1
        if members > MAX_MEMBERS:
            raise BundleError(
                f"{name}: more than {MAX_MEMBERS} tar records", reason="too_many_members"
            )
        f.seek((size + _BLOCK - 1) // _BLOCK * _BLOCK, 1)
    f.seek(start)


class BundleReader:
    """An open bundle whose manifest has been parsed but whose files are not yet checked."""

    def __init__(
        self,
        tar: tarfile.TarFile,
        manifest: Manifest,
        manifest_bytes: bytes,
        signatures: list[Signature],
        signature_bytes: bytes | None,
    ) -> None:
        self._tar = tar
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.signatures = signatures
        self._signature_bytes = signature_bytes

    def _members(self) -> list[tarfile.TarInfo]:
        try:
            return self._tar.getmembers()
        except (tarfile.TarError, ValueError, UnicodeError, EOFError) as e:
            raise BundleError(f"not a bundle (tar): {e}", reason="not_a_bundle") from e

    def extract_verified(self, dest: Path) -> None:
        """Check every member against the manifest while copying it below ``dest``.

        ``dest`` must be an empty staging directory; on any error the caller discards it.
        """
        listed: dict[str, FileEntry] = {e.path: e for e in self.manifest.files}
        seen: set[str] = set()
        dest_root = dest.resolve()
        for member in self._members():
            _check_member_name(member.name)
            if not member.isfile():
                raise BundleError(
                    f"bundle member {member.name!r} is not a regular file",
                    reason="unsafe_member",
                    member=member.name,
                )
            if member.name in seen:
                raise BundleError(
                    f"bundle member {member.name!r} appears twice",
                    reason="duplicate_member",
                    member=member.name,
                )
            seen.add(member.name)
            if member.name in (MANIFEST_NAME, SIGNATURE_NAME):
                continue
            entry = listed.get(member.name)
            if entry is None:
                raise BundleError(
                    f"bundle member {member.name!r} is not listed in the manifest",
                    reason="unlisted_member",
                    member=member.name,
                )
            if member.size != entry.size:
                raise BundleError(
                    f"{member.name}: size {member.size} does not match the manifest's {entry.size}",
                    reason="size_mismatch",
                    member=member.name,
                )
            target = (dest_root / member.name).resolve()
            if dest_root not in target.parents:
                raise BundleError(
                    f"bundle member {member.name!r} escapes the staging directory",
                    reason="unsafe_path",
                    member=member.name,
                )
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as e:
                raise BundleError(
                    f"bundle member {member.name!r} is nested under another member's file",
                    reason="unsafe_path",
                    member=member.name,
                ) from e
            h = hashlib.sha256()
            try:
                src = self._tar.extractfile(member)
                assert src is not None  # regular file, checked above
                with target.open("xb") as out:
                    remaining = entry.size
                    while remaining > 0:
                        chunk = src.read(min(_CHUNK, remaining))
                        if not chunk:
                            break
                        h.update(chunk)
                        out.write(chunk)
                        remaining -= len(chunk)
            except (tarfile.TarError, EOFError) as e:
                raise BundleError(
                    f"{member.name}: cannot be read ({e})",
                    reason="not_a_bundle",
                    member=member.name,
                ) from e
            if h.hexdigest() != entry.sha256:
                raise BundleError(
                    f"{member.name}: sha256 does not match the manifest",
                    reason="digest_mismatch",
                    member=member.name,
                )
        missing = set(listed) - seen
        if missing:
            raise BundleError(
                f"bundle is missing files the manifest lists: {sorted(missing)}",
                reason="missing_member",
            )
        (dest / MANIFEST_NAME).write_bytes(self.manifest_bytes)
        if self._signature_bytes is not None:
            (dest / SIGNATURE_NAME).write_bytes(self._signature_bytes)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
    try:
        f = tar.extractfile(member)
        assert f is not None  # a regular file, checked by the caller
        return f.read()
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(
            f"{name}: {member.name} cannot be read ({e})", reason="not_a_bundle"
        ) from e


@contextmanager
def open_bundle(path: Path) -> Iterator[BundleReader]:
    """Open a bundle and parse its manifest (the first member). Whatever the bytes hold, what
    comes out is a :class:`BundleError` naming the problem."""
    try:
        with path.open("rb") as raw_tar:
            scan_tar_headers(raw_tar, path.name)
        tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by the `with tar` below
    except (tarfile.TarError, OSError, ValueError) as e:
        raise BundleError(f"{path.name}: not a bundle (tar): {e}", reason="not_a_bundle") from e
    with tar:
        try:
            first = tar.next()
        except (tarfile.TarError, ValueError, UnicodeError) as e:
            raise BundleError(f"{path.name}: not a bundle (tar): {e}", reason="not_a_bundle") from e
        if first is None or first.name != MANIFEST_NAME or not first.isfile():
            raise BundleError(
                f"{path.name}: the first member must be {MANIFEST_NAME}", reason="no_manifest"
            )
        if first.size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path.name}: manifest too large", reason="manifest_too_large")
        raw = _read_member(tar, first, path.name)
        try:
            manifest = Manifest.from_dict(parse_canonical(raw))
        except ValueError as e:
            raise BundleError(
                f"{path.name}: invalid manifest: {e}", reason="manifest_invalid"
            ) from e
        signatures, sig_raw = _read_signatures(tar, path)
        yield BundleReader(tar, manifest, raw, signatures, sig_raw)


def _read_signatures(tar: tarfile.TarFile, path: Path) -> tuple[list[Signature], bytes | None]:
    """``manifest.sig`` when it is the second member; an unsigned bundle has none."""
    try:
        second = tar.next()
    except (tarfile.TarError, ValueError, UnicodeError) as e:
        raise BundleError(f"{path.name}: not a bundle (tar): {e}", reason="not_a_bundle") from e
    if second is None or second.name != SIGNATURE_NAME:
        return [], None
    if not second.isfile() or second.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path.name}: malformed {SIGNATURE_NAME}", reason="signature_invalid")
    raw = _read_member(tar, second, path.name)
    try:
        doc = parse_json(raw)
        return [Signature.from_dict(s) for s in doc["signatures"]], raw
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(
            f"{path.name}: malformed {SIGNATURE_NAME}: {e}", reason="signature_invalid"
        ) from e
