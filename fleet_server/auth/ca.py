"""The fleet CA: X.509 identities for devices, the broker, and the server on MQTT.

Devices send a certificate signing request at enrollment (their private key never leaves
them); the certificate's CN is the device id, which the broker uses as the username
(``use_identity_as_username``) and client id (``use_username_as_clientid``) so that ACL
patterns with ``%u`` confine each device to its own topics. EC P-256 keys: supported by every
TLS stack a Jetson or Raspberry Pi ships.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.contracts.durable import write_atomic
from fleet_server.errors import InvalidInputError

SERVER_IDENTITY = "edgefleet-server"


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, pem, mode=0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class FleetCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, directory: Path) -> FleetCA:
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.is_file() and cert_path.is_file():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("edgefleet fleet CA"))
            .issuer_name(_name("edgefleet fleet CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert)

    def _issue(
        self,
        cn: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        server: bool,
        hosts: list[str],
        days: float,
    ) -> x509.Certificate:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def sign_device_csr(self, csr_pem: str, device_id: str, days: float = 365) -> str:
        """The device's client certificate (PEM): :meth:`issue_device_certificate`."""
        cert = self.issue_device_certificate(csr_pem, device_id, days)
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue_device_certificate(
        self, csr_pem: str, device_id: str, days: float = 365
    ) -> x509.Certificate:
        """The device's client certificate; its CSR must be self-consistent and name the
        device id as its CN (and nothing else may be asked for)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as e:
            raise InvalidInputError(f"not a PEM certificate request: {e}", field="csr") from e
        if not csr.is_signature_valid:
            raise InvalidInputError("the certificate request's signature is invalid", field="csr")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [a.value for a in cns] != [device_id]:
            raise InvalidInputError(
                f"the certificate request must have CN={device_id}", field="csr"
            )
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise InvalidInputError("the certificate request must carry an EC key", field="csr")
        return self._issue(device_id, public, server=False, hosts=[], days=days)

    def issue_keypair(
        self,
        cn: str,
        directory: Path,
        stem: str,
        *,
        server: bool,
        hosts: list[str] | None = None,
        days: int = 825,
    ) -> tuple[Path, Path]:
        """Key and certificate for an identity the server side runs (broker, control plane)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(cn, key.public_key(), server=server, hosts=hosts or [], days=days)
        key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.crt"
        _write_private(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key_path, cert_path
