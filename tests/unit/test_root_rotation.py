"""Root key rotation on the agent, as TUF specifies it: root N+1 is accepted only when signed
by root N's key and by its own; an agent walks from the root it pinned one version at a time
(through several rotations if it was offline), pins the newest, and a document whose keyring
the chain does not vouch for changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.contracts.errors import BundleError
from edge_agent.lifecycle.acceptance import DesiredStateGate
from edge_agent.lifecycle.journal import Journal
from edge_agent.trust import PinnedRoot, RootDocument, SignedRoot, TrustStore, walk_roots
from edge_agent.trust.keyring import MAX_ROOT_STEPS
from edge_agent.trust.signing import public_key_to_b64
from fleet_server.keys.service import sign_bytes
from tests.factories import TestFleet


def root_doc(version: int, new: Ed25519PrivateKey, *signers: Ed25519PrivateKey) -> SignedRoot:
    document = RootDocument(version=version, public=public_key_to_b64(new.public_key()),
                            issued_at=datetime.now(UTC).replace(microsecond=0))  # fmt: skip
    return SignedRoot(
        signed=document, signatures=[sign_bytes(k, document.canonical()) for k in signers]
    )


@pytest.fixture
def fleet() -> TestFleet:
    return TestFleet()


def test_the_chain_is_walked_one_version_at_a_time(fleet: TestFleet) -> None:
    r2, r3 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    d2, d3 = root_doc(2, r2, fleet.root, r2), root_doc(3, r3, r2, r3)
    start = PinnedRoot(fleet.root.public_key(), 1)
    assert walk_roots(start, [d2]).version == 2
    # Offline through two rotations: both steps, in any order given.
    reached = walk_roots(start, [d3, d2])
    assert reached.version == 3 and reached.document == d3
    # A gap stops the walk where it is (nothing vouches for 3 from 1).
    assert walk_roots(start, [d3]).version == 1


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("signed only by itself", "not signed by the previous root"),
        ("signed only by the old root", "not signed by its own key"),
        ("signed by a stranger and itself", "not signed by the previous root"),
    ],
)
def test_a_root_the_chain_does_not_vouch_for_is_refused(
    fleet: TestFleet, case: str, needle: str
) -> None:
    r2, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signers = {
        "signed only by itself": (r2,),
        "signed only by the old root": (fleet.root,),
        "signed by a stranger and itself": (stranger, r2),
    }[case]
    with pytest.raises(BundleError, match=needle) as e:
        walk_roots(PinnedRoot(fleet.root.public_key(), 1), [root_doc(2, r2, *signers)])
    assert e.value.reason == "root_invalid"


def test_the_walk_is_capped(fleet: TestFleet) -> None:
    keys = [fleet.root] + [Ed25519PrivateKey.generate() for _ in range(MAX_ROOT_STEPS + 1)]
    chain = [root_doc(v + 1, keys[v], keys[v - 1], keys[v]) for v in range(1, len(keys))]
    with pytest.raises(BundleError, match="enroll this device again"):
        walk_roots(PinnedRoot(fleet.root.public_key(), 1), chain)


def _gate(tmp_path: Path, store: TrustStore) -> DesiredStateGate:
    return DesiredStateGate("cam-1", Journal(tmp_path / "journal.json"), store)


def test_a_device_enrolled_under_root_1_accepts_a_keyring_under_root_3(
    tmp_path: Path, fleet: TestFleet
) -> None:
    gate = _gate(tmp_path, fleet.trust_store(tmp_path / "keyring.json"))
    r2, r3 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    chain = [root_doc(2, r2, fleet.root, r2), root_doc(3, r3, r2, r3)]
    ring = fleet.make_keyring({fleet.online: {}}, version=2, root=r3)
    doc = fleet.desired("cam-1", 1, {}, keyring=ring).replace(roots=chain)
    gate.accept(doc)
    assert gate.trust.pinned.version == 3 and gate.trust.keyring.version == 2
    # Pinned on disk: a restarted agent holds root 3 and checks documents without the chain.
    again = TrustStore(fleet.root.public_key(), tmp_path / "keyring.json")
    assert again.pinned.version == 3
    assert public_key_to_b64(again.root) == public_key_to_b64(r3.public_key())
    _gate(tmp_path / "x", again).accept(fleet.desired("cam-1", 2, {}, keyring=ring))


def test_a_keyring_signed_by_an_unvouched_root_changes_nothing(
    tmp_path: Path, fleet: TestFleet
) -> None:
    gate = _gate(tmp_path, fleet.trust_store(tmp_path / "keyring.json"))
    before = (tmp_path / "keyring.json").read_bytes()
    forged = Ed25519PrivateKey.generate()
    ring = fleet.make_keyring({fleet.online: {}}, version=2, root=forged)
    for roots in ([], [root_doc(2, forged, forged)]):  # no chain, or one signed by itself
        doc = fleet.desired("cam-1", 1, {}, keyring=ring).replace(roots=roots)
        with pytest.raises(BundleError) as e:
            gate.accept(doc)
        assert e.value.reason in ("keyring_invalid", "root_invalid")
    assert gate.trust.pinned.version == 1 and not (tmp_path / "root.json").exists()
    assert (tmp_path / "keyring.json").read_bytes() == before
    assert gate.journal.data.desired_seq == 0


def test_a_device_that_pinned_a_later_root_finds_itself_in_the_chain(
    tmp_path: Path, fleet: TestFleet
) -> None:
    """Enrolled after the first rotation: its pinned key is root 2's."""
    r2, r3 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    chain = [root_doc(2, r2, fleet.root, r2), root_doc(3, r3, r2, r3)]
    store = TrustStore(r2.public_key(), tmp_path / "keyring.json")
    ring = fleet.make_keyring({fleet.online: {}}, version=4, root=r3)
    doc = fleet.desired("cam-1", 1, {}, keyring=ring).replace(roots=chain)
    _gate(tmp_path, store).accept(doc)
    assert store.pinned.version == 3
