"""The agent's certificate files: when renewal is due, and what a crash in the middle of a
switch leaves behind, put right at the next start."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.link.identity import (
    certificate_facts,
    certificate_status,
    new_key_and_csr,
    recover,
    renewal_due,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CA_KEY = ec.generate_private_key(ec.SECP256R1())


def _cert(key_pem: bytes, start: datetime, days: float) -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .sign(CA_KEY, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _pair(directory: Path) -> tuple[Path, Path, bytes, bytes]:
    key_pem, _ = new_key_and_csr("dev-1")
    cert_pem = _cert(key_pem, T0, 300)
    cert, key = directory / "device.crt", directory / "device.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return cert, key, cert_pem, key_pem


def test_renewal_is_due_once_less_than_the_share_is_left(tmp_path: Path) -> None:
    cert, _, _, _ = _pair(tmp_path)  # valid 300 days from T0
    assert not renewal_due(cert, 1 / 3, T0 + timedelta(days=100))
    assert not renewal_due(cert, 1 / 3, T0 + timedelta(days=199))
    assert renewal_due(cert, 1 / 3, T0 + timedelta(days=201))
    assert renewal_due(cert, 1 / 3, T0 + timedelta(days=400))  # expired: due all the more


def test_nothing_pending_is_left_alone(tmp_path: Path) -> None:
    cert, key, cert_pem, key_pem = _pair(tmp_path)
    assert recover(cert, key) is None
    assert cert.read_bytes() == cert_pem and key.read_bytes() == key_pem


def test_a_new_pair_never_switched_to_is_dropped(tmp_path: Path) -> None:
    cert, key, cert_pem, key_pem = _pair(tmp_path)
    new_key, _ = new_key_and_csr("dev-1")
    (tmp_path / "device.key.new").write_bytes(new_key)
    (tmp_path / "device.crt.new").write_bytes(_cert(new_key, T0, 300))
    assert recover(cert, key) is not None
    assert cert.read_bytes() == cert_pem and key.read_bytes() == key_pem
    assert not list(tmp_path.glob("*.new"))
    # Only the key written (a crash before the certificate was): dropped too.
    (tmp_path / "device.key.new").write_bytes(new_key)
    assert recover(cert, key) is not None and not list(tmp_path.glob("*.new"))
    assert key.read_bytes() == key_pem


def test_a_switch_cut_between_the_two_renames_is_finished(tmp_path: Path) -> None:
    cert, key, _, _ = _pair(tmp_path)
    new_key, _ = new_key_and_csr("dev-1")
    new_cert = _cert(new_key, T0, 300)
    key.write_bytes(new_key)  # the key was renamed into place, the certificate not yet
    (tmp_path / "device.crt.new").write_bytes(new_cert)
    assert recover(cert, key) == "finished switching to the renewed certificate"
    assert cert.read_bytes() == new_cert and key.read_bytes() == new_key
    assert not list(tmp_path.glob("*.new"))


def test_a_stray_certificate_for_another_key_is_dropped(tmp_path: Path) -> None:
    cert, key, cert_pem, key_pem = _pair(tmp_path)
    other, _ = new_key_and_csr("dev-1")
    (tmp_path / "device.crt.new").write_bytes(_cert(other, T0, 300))
    assert recover(cert, key) is not None
    assert cert.read_bytes() == cert_pem and key.read_bytes() == key_pem
    assert not list(tmp_path.glob("*.new"))


def test_the_running_agent_reads_its_certificate_from_the_facts_kept_beside_it(
    tmp_path: Path,
) -> None:
    cert, _, cert_pem, _ = _pair(tmp_path)
    parsed = x509.load_pem_x509_certificate(cert_pem)
    serial, start, end = certificate_facts(cert)  # as enrollment does: parsed, facts kept
    assert (serial, start, end) == (
        format(parsed.serial_number, "x"), parsed.not_valid_before_utc, parsed.not_valid_after_utc
    )  # fmt: skip
    facts = json.loads((tmp_path / "device.crt.facts.json").read_text())
    assert facts["serial"] == serial
    # A fresh process (the agent) answers from them, without loading cryptography's x509.
    code = (
        "import sys; from pathlib import Path; from datetime import datetime;"
        "from edge_agent.link.identity import certificate_status, renewal_due, expired;"
        f"c = Path({str(cert)!r}); s = certificate_status(c);"
        "print(s.serial, s.not_after.isoformat(), renewal_due(c, 1/3), expired(c),"
        " 'cryptography' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [serial, end.isoformat(), "True", "True", "False"], out.stderr


def test_facts_that_do_not_match_the_certificate_are_made_again(tmp_path: Path) -> None:
    cert, _, _, key_pem = _pair(tmp_path)
    old_serial = certificate_status(cert).serial
    facts_file = tmp_path / "device.crt.facts.json"
    # Another certificate in its place (a renewal, a restore from backup): its own facts.
    cert.write_bytes(_cert(key_pem, T0 + timedelta(days=10), 30))
    renewed = certificate_status(cert)
    assert renewed.serial != old_serial
    assert renewed.not_after == T0 + timedelta(days=40)
    assert json.loads(facts_file.read_text())["serial"] == renewed.serial
    # Damaged facts (or lying about the same certificate's tag) are parsed over, not believed.
    for damage in (b"{not json", b"[]", json.dumps({"sha256": "0" * 64}).encode()):
        facts_file.write_bytes(damage)
        assert certificate_status(cert) == renewed
    facts_file.write_text(json.dumps({**json.loads(facts_file.read_text()), "serial": "f00"}))
    assert certificate_status(cert).serial == "f00"  # the tag matches: kept facts are used
