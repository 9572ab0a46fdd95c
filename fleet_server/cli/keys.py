"""``edgefleet keys``: the key ceremony. The root key stays on this machine; the server gets
signed keyrings only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fleet_server.cli.context import JsonOpt, client_from_env, console
from fleet_server.client import ApiClient

if TYPE_CHECKING:
    from edge_agent.trust import SignedKeyring

# The ceremony's own modules (the keyring's models, the signing service and its tables) are
# imported by the commands that sign, not by every `edgefleet` start.

keys_app = typer.Typer(no_args_is_help=True, help="Fleet signing keys (offline root, online keys).")

RootKeyOpt = Annotated[
    Path, typer.Option("--root-key", help="the offline root key file (passphrase-encrypted PEM)")
]
TtlOpt = Annotated[int, typer.Option(help="validity of the new keyring in days")]


def _passphrase(confirm: bool = False) -> str:
    env = os.environ.get("EDGEFLEET_ROOT_PASSPHRASE")
    if env is not None:
        return env
    return str(typer.prompt("root key passphrase", hide_input=True, confirmation_prompt=confirm))


def _client_factory() -> Any:
    return client_from_env()


def _install(client: ApiClient, root_public: str, signed: SignedKeyring) -> dict[str, Any]:
    result: dict[str, Any] = client.request(
        "PUT",
        "/v1/keyring",
        json={"root_public_key": root_public, "keyring": signed.to_dict()},
    )
    return result


def _current(client: ApiClient) -> tuple[str, SignedKeyring]:
    from edge_agent.trust import SignedKeyring

    trust = client.get("/v1/trust")
    return trust["root_public_key"], SignedKeyring.from_dict(trust["keyring"])


def _report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    console.print(
        f"keyring version {result['version']} installed; "
        f"{result['reissued']} device(s) get a re-signed desired state"
    )
    _print_keys(result["keys"])


def _print_keys(keys: list[dict[str, Any]]) -> None:
    table = Table("key id", "state", "expires")
    for k in keys:
        table.add_row(k["keyid"], k["state"], k["expires_at"][:19])
    console.print(table)


@keys_app.command("init")
def keys_init(root_key: RootKeyOpt, ttl_days: TtlOpt = 365, as_json: JsonOpt = False) -> None:
    """Create the root key (here, encrypted) and the first keyring with one online key."""
    from edge_agent.trust.signing import public_key_to_b64
    from fleet_server.keys.root import create_root_key, next_keyring
    from fleet_server.keys.service import sign_keyring
    from fleet_server.keys.tables import OnlineKeyPublic

    client = _client_factory()
    root = create_root_key(root_key, _passphrase(confirm=True))
    online = OnlineKeyPublic.model_validate(client.post("/v1/keys/online", json={}))
    signed = sign_keyring(root, next_keyring(None, add=online, ttl_days=ttl_days))
    root_public = public_key_to_b64(root.public_key())
    result = _install(client, root_public, signed)
    if as_json:
        print(json.dumps({**result, "root_public_key": root_public}, indent=2, default=str))
        return
    _report(result, as_json)
    console.print(f"root key written to {root_key}: keep it offline and backed up.")
    console.print(f"root public key (pin it on devices with --root-key): {root_public}")


@keys_app.command("rotate")
def keys_rotate(root_key: RootKeyOpt, ttl_days: TtlOpt = 365, as_json: JsonOpt = False) -> None:
    """Add a new online key; the server signs with it from now on."""
    from fleet_server.keys.root import load_root_key, next_keyring
    from fleet_server.keys.service import sign_keyring
    from fleet_server.keys.tables import OnlineKeyPublic

    client = _client_factory()
    root = load_root_key(root_key, _passphrase())
    root_public, current = _current(client)
    online = OnlineKeyPublic.model_validate(client.post("/v1/keys/online", json={}))
    signed = sign_keyring(root, next_keyring(current.signed, add=online, ttl_days=ttl_days))
    _report(_install(client, root_public, signed), as_json)


@keys_app.command("revoke")
def keys_revoke(
    keyid: Annotated[str, typer.Argument(help="the online key to revoke")],
    root_key: RootKeyOpt,
    ttl_days: TtlOpt = 365,
    as_json: JsonOpt = False,
) -> None:
    """Revoke an online key: agents refuse anything it signed from now on."""
    from fleet_server.keys.root import load_root_key, next_keyring
    from fleet_server.keys.service import sign_keyring

    client = _client_factory()
    root = load_root_key(root_key, _passphrase())
    root_public, current = _current(client)
    signed = sign_keyring(root, next_keyring(current.signed, revoke=keyid, ttl_days=ttl_days))
    _report(_install(client, root_public, signed), as_json)


@keys_app.command("rotate-root")
def keys_rotate_root(
    root_key: RootKeyOpt,
    new_root_key: Annotated[
        Path,
        typer.Option("--new-root-key", help="where to write the new root key (must not exist)"),
    ],
    ttl_days: TtlOpt = 365,
    as_json: JsonOpt = False,
) -> None:
    """Replace the root key (TUF's root rotation): root N+1 is signed by root N and by itself,
    the next keyring by the new root; devices walk the chain from the root they pinned. The
    old root's passphrase is EDGEFLEET_ROOT_PASSPHRASE (or asked), the new one's
    EDGEFLEET_NEW_ROOT_PASSPHRASE (or asked twice). Keep the new key offline, like the old."""
    from datetime import UTC, datetime

    from edge_agent.contracts.errors import ConfigError
    from edge_agent.trust import RootDocument, SignedKeyring, SignedRoot
    from edge_agent.trust.signing import public_key_to_b64
    from fleet_server.keys.root import create_root_key, load_root_key, next_keyring
    from fleet_server.keys.service import sign_bytes, sign_keyring

    client = _client_factory()
    old = load_root_key(root_key, _passphrase())  # nothing is made without the old root
    trust = client.get("/v1/trust")
    if public_key_to_b64(old.public_key()) != trust["root_public_key"]:
        raise ConfigError(f"{root_key} is not the fleet's root in force; nothing was changed")
    current = SignedKeyring.from_dict(trust["keyring"])
    passphrase = os.environ.get("EDGEFLEET_NEW_ROOT_PASSPHRASE")
    if passphrase is None:
        passphrase = str(
            typer.prompt("new root key passphrase", hide_input=True, confirmation_prompt=True)
        )
    new = create_root_key(new_root_key, passphrase)  # refuses an existing file
    new_public = public_key_to_b64(new.public_key())
    document = RootDocument(
        version=int(trust.get("root_version", 1)) + 1,
        public=new_public,
        issued_at=datetime.now(UTC).replace(microsecond=0),
    )
    root = SignedRoot(
        signed=document,
        signatures=[sign_bytes(old, document.canonical()), sign_bytes(new, document.canonical())],
    )
    signed = sign_keyring(new, next_keyring(current.signed, ttl_days=ttl_days))
    try:
        result: dict[str, Any] = client.request(
            "PUT",
            "/v1/keyring",
            json={
                "root_public_key": new_public,
                "keyring": signed.to_dict(),
                "root": root.to_dict(),
            },
        )
    except BaseException:
        new_root_key.unlink(missing_ok=True)  # the server has not taken it: no stray root
        raise
    if as_json:
        print(json.dumps({**result, "root_version": document.version,
                          "root_public_key": new_public}, indent=2, default=str))  # fmt: skip
        return
    _report(result, as_json)
    console.print(
        f"root version {document.version} installed; new root key in {new_root_key}: keep it "
        f"offline and backed up. Devices enrolled from now on pin {new_public}; devices "
        "enrolled before follow the chain."
    )


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False) -> None:
    """The keyring in force."""
    ring = _client_factory().get("/v1/keyring")
    if as_json:
        print(json.dumps(ring, indent=2, default=str))
        return
    console.print(f"keyring version {ring['version']}, root {ring['root_public_key']}")
    _print_keys(ring["keys"])


@keys_app.command("export-trust")
def keys_export_trust(as_json: JsonOpt = True) -> None:
    """Print the root public key and keyring (for `edgefleet bundle verify --trust FILE`);
    JSON is its only form."""
    print(json.dumps(_client_factory().get("/v1/trust"), indent=2))
