"""Transport credentials for a deployed federation: a CA, the SuperLink's TLS certificate, node keys.

Everything cryptographic is delegated to the ``cryptography`` package:

- the CA is a self-signed X.509 certificate over an ECDSA P-384 key (``BasicConstraints(ca=True)``);
- the SuperLink's certificate is signed by that CA, with subject-alternative names for every host
  name / IP it is reached at (``127.0.0.1`` and ``localhost`` always included);
- each site's node-authentication key is an ECDSA P-384 key pair serialized in OpenSSH format, which
  is what ``flower-supernode --auth-supernode-private-key`` loads and ``flwr supernode register``
  accepts.

This module knows nothing about privacy ledgers or site policies (``fedtune.deploy_cli`` adds those).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "SITE_NAME",
    "NodeKeyPair",
    "ca_certificate",
    "flower_config_toml",
    "node_key_pair",
    "parse_hosts",
    "parse_sites",
    "server_certificate",
    "write_file",
]

DEFAULT_PORT = 8000  # flower-superlink's default HTTP port (Fleet, Control and Runtime APIs)
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_CURVE = ec.SECP384R1()
_LOOPBACK = ("127.0.0.1", "localhost")


def parse_sites(text: str) -> list[str]:
    """Split ``"a,b,c"`` into site names; every problem is reported at once."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    problems = [
        f"site name '{n}' must be 1-63 letters, digits, '-' or '_' (starting with a letter or digit)"
        for n in names
        if not SITE_NAME.match(n)
    ]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"site names must be unique; repeated: {', '.join(dupes)}")
    if not names:
        problems.append("give at least one site name, e.g. --sites hospital-a,hospital-b")
    if problems:
        raise ConfigError("--sites", problems)
    return names


def parse_hosts(text: str) -> list[str]:
    """Split ``"link.example.org,10.0.0.5"`` into SAN entries, loopback names appended."""
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise ConfigError("--superlink-host", ["give the host name or IP the sites will dial"])
    bad = [h for h in hosts if not re.match(r"^[A-Za-z0-9.:*-]+$", h)]
    if bad:
        raise ConfigError("--superlink-host", [f"'{h}' is not a host name or IP address" for h in bad])
    return list(dict.fromkeys([*hosts, *_LOOPBACK]))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ca_certificate(
    common_name: str = "fedtune federation CA", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA key and certificate (may sign server certificates only)."""
    key = ec.generate_private_key(_CURVE)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server key and certificate for the SuperLink, signed by the CA.

    Parameters
    ----------
    ca_key, ca_cert
        The issuing CA.
    hosts
        Host names and IP addresses the certificate is valid for (subject alternative names).
    days
        Validity period.
    """
    key = ec.generate_private_key(_CURVE)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode's authentication key pair, both halves in OpenSSH format."""

    private_openssh: bytes
    public_openssh: bytes


def node_key_pair(comment: str) -> NodeKeyPair:
    """A new ECDSA P-384 node-authentication key pair (OpenSSH format, as Flower expects)."""
    key = ec.generate_private_key(_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return NodeKeyPair(private, public + f" {comment}\n".encode())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PEM (PKCS#8, unencrypted) bytes of a private key, for TLS servers."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    """PEM bytes of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def write_file(path: Path, data: bytes, *, secret: bool = False) -> Path:
    """Create ``path`` (never overwrite); secrets get mode 0o600, others 0o644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path


def flower_config_toml(name: str, address: str, root_certificates: Path | None) -> str:
    """A Flower ``$FLWR_HOME/config.toml`` with one SuperLink connection, the default.

    ``root_certificates`` must be absolute (Flower rejects relative paths); ``None`` writes an
    insecure connection (testing only).
    """
    import tomli_w

    link: dict[str, object] = {"address": address}
    if root_certificates is not None:
        link["root-certificates"] = str(root_certificates.resolve())
    else:
        link["insecure"] = True  # TLS OFF: testing only
    return tomli_w.dumps({"superlink": {"default": name, name: link}})
