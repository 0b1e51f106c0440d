"""Keys and certificates for a deployment, made with the `cryptography` package.

- The coordinator's private certificate authority (CA) and the SuperLink's TLS certificate,
  with the DNS names and IP addresses sites use to reach it as subject alternative names.
- A site's node-authentication key pair: an ECDSA P-384 key, the kind Flower's SuperNode
  authentication expects, stored in OpenSSH format; the public half goes to the coordinator.

Private keys are created with 0600 permissions (never readable by others, not even for an
instant) and are never overwritten unless asked to.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedscan.common.errors import FedscanError

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime browsers and most TLS stacks accept for a leaf


def write_secret(path: Path, data: bytes, force: bool = False) -> None:
    """Write a private key: mode 0600 from creation, refusing to replace one unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FedscanError(
            f"{path} already exists; not overwriting a key",
            hint="pass --force to replace it (sites or peers using the old one will be refused)",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    os.chmod(path, 0o600)


def write_public(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedscan federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = _name("fedscan federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not hosts:
        raise FedscanError(
            "at least one --host is needed: the name or IP address sites use to reach the server"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca(ca_cert_path: Path, ca_key_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(ca_key_path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise FedscanError(f"cannot load the CA from {ca_cert_path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedscanError(f"{ca_key_path} is not an EC private key")
    return key, cert


def server_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return _pem_key(key)


def make_site_key() -> tuple[bytes, bytes]:
    """(private key in OpenSSH format, public key in OpenSSH format) for node authentication."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def load_site_public_key(path: Path) -> bytes:
    """Validate an OpenSSH EC public key file and return its bytes."""
    try:
        data = Path(path).read_bytes().strip()
        key = serialization.load_ssh_public_key(data)
    except (OSError, ValueError) as exc:
        raise FedscanError(
            f"{path} is not an OpenSSH public key: {exc}",
            hint="use the site.pub that `fedscan site init` printed the fingerprint of",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedscanError(f"{path} is not an ECDSA public key; Flower's node authentication needs one")
    return data + b"\n"


def fingerprint(public_openssh: bytes) -> str:
    """SHA256 fingerprint as `ssh-keygen -l` prints it, for checking a key out of band."""
    blob = base64.b64decode(public_openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
