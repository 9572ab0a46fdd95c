"""The artifact store: a local directory of blobs addressed by their sha256.

    <root>/sha256/ab/abcdef…   (the first two hex digits fan the files out)

A blob appears only by an atomic rename of a fully written temp file, so a reader never sees
a partial one. Content addressing makes writes idempotent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edge_agent.bundle import sha256_file


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def scratch_dir(self) -> Path:
        """A private temp directory on the store's filesystem (so renames are atomic)."""
        return Path(tempfile.mkdtemp(dir=self.root / "tmp"))

    def put_file(self, src: Path, sha256: str | None = None) -> tuple[str, int]:
        """Move ``src`` (a file this process wrote) into the store; ``sha256`` when the
        writer hashed it on the way (else it is read again to hash it)."""
        size = src.stat().st_size  # before the move
        return self._commit(src, sha256 or sha256_file(src)), size

    def _commit(self, tmp: Path, sha256: str) -> str:
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            tmp.unlink(missing_ok=True)
        else:
            try:
                os.replace(tmp, final)
            except OSError:  # another filesystem: copy, then rename
                shutil.copyfile(tmp, final.with_suffix(".tmp"))
                os.replace(final.with_suffix(".tmp"), final)
                tmp.unlink(missing_ok=True)
        return sha256
