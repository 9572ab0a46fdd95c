"""``edgefleet bundle``: inspect and verify bundle files offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fleet_server.cli.context import (
    JsonOpt,
    console,
    print_json,
)

bundle_app = typer.Typer(no_args_is_help=True, help="Inspect and verify bundle files offline.")


@bundle_app.command("inspect")
def bundle_inspect(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    as_json: JsonOpt = True,
) -> None:
    """Print a bundle's manifest (JSON is its only form; --json is accepted for symmetry)."""
    from edge_agent.bundle import open_bundle

    with open_bundle(file) as reader:
        print_json(reader.manifest.to_dict())


@bundle_app.command("verify")
def bundle_verify(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    trust: Annotated[
        Path | None,
        typer.Option(
            help="root key + keyring JSON (edgefleet keys export-trust) to check the signature"
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="also check it fits this device profile")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a bundle: signature (with --trust), structure, file digests and sizes, fit."""
    import shutil
    import tempfile

    from edge_agent.bundle import open_bundle, verify_bundle
    from edge_agent.runtimes import available_runtimes
    from edge_agent.trust import SignedKeyring, TrustStore
    from edge_agent.trust.signing import public_key_from_b64

    with open_bundle(file) as reader:
        manifest, signatures = reader.manifest, reader.signatures
    workdir = Path(tempfile.mkdtemp())
    try:
        store = None
        if trust is not None:
            doc = json.loads(trust.read_text())
            store = TrustStore(
                public_key_from_b64(doc["root_public_key"]), workdir / "keyring.json"
            )
            store.update(SignedKeyring.from_dict(doc["keyring"]))
        verify_bundle(
            file,
            workdir / "bundle",
            profile=profile,
            runtimes=available_runtimes() if profile else None,
            trust=store,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if store is not None:
        signed = f"signature by {', '.join(s.keyid for s in signatures)} verified"
    elif signatures:
        signed = f"signed by {', '.join(s.keyid for s in signatures)} (not checked: pass --trust)"
    else:
        signed = "UNSIGNED"
    if as_json:
        print_json(
            {
                "ok": True,
                "model": manifest.model.name,
                "version": manifest.model.version,
                "profile": manifest.profile,
                "runtime": manifest.runtime.name,
                "precision": manifest.precision,
                "files": len(manifest.files),
                "signed_by": [s.keyid for s in signatures],
                "signature_checked": store is not None,
            }
        )
        return
    console.print(
        f"ok: {manifest.model.name} {manifest.model.version} for {manifest.profile} "
        f"({manifest.runtime.name}/{manifest.precision}), "
        f"{len(manifest.files)} files verified, {signed}"
    )
