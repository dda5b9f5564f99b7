"""Ed25519 signing keys for privacy ledgers (generation, loading, fingerprints).

A site signs every ledger entry with its private key; the site's compliance
officer hands only the public key to auditors. All cryptography is delegated to
the ``cryptography`` package: keys are Ed25519, private keys are written as PEM
PKCS#8 (optionally encrypted with ``BestAvailableEncryption``), public keys as PEM
SubjectPublicKeyInfo, and signatures are stored as standard base64 text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import FedtuneError

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "KeyFileError",
    "SigningKey",
    "generate_keypair",
    "load_public_key",
    "load_signer",
    "load_signing_key",
    "load_verifier",
    "public_key_fingerprint",
    "public_key_from_pem",
    "verifier_for",
]

logger = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "ledger-signing-key.pem"
PUBLIC_KEY_NAME = "ledger-signing-key.pub.pem"


class KeyFileError(FedtuneError):
    """A key file is missing, of the wrong type, or cannot be decrypted."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self._init = ((path, problem, fix), {})
        self.path = path
        super().__init__(f"{path}: {problem}. Fix: {fix}")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively (never overwrite) with permissions ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask cannot widen it, but may have narrowed it oddly
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(out_dir: Path, *, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Create a new Ed25519 ledger-signing key pair in ``out_dir``.

    Parameters
    ----------
    out_dir
        Folder to write to (created with mode 0o700 if missing).
    passphrase
        If given (non-empty), the private key is encrypted with it.

    Returns
    -------
    (Path, Path)
        The private key file (PEM PKCS#8, mode 0o600) and the public key file (PEM).

    Raises
    ------
    FedtuneError
        A key file already exists there (keys are never overwritten) or the passphrase is empty.
    """
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    if passphrase is not None and not passphrase:
        raise KeyFileError(private_path, "the passphrase is empty", "give a non-empty passphrase or none")
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(
                path,
                "already exists; a signing key is never overwritten",
                "choose another --out folder, or move the old pair away first (keep the old public "
                "key: auditors need it to verify ledgers it signed)",
            )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return private_path, public_path


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(path, f"{what} file not found", f"check the path of the {what}") from None
    except IsADirectoryError:
        raise KeyFileError(path, "is a folder, not a key file", f"pass the {what} file itself") from None
    except PermissionError:
        raise KeyFileError(path, "cannot be read (permission denied)", "run as the key's owner") from None


def _load_private(path: Path, passphrase: bytes | None) -> Ed25519PrivateKey:
    data = _read(path, "private key")
    if b"PUBLIC KEY-----" in data:
        raise KeyFileError(path, "is a public key", f"pass the private key ({PRIVATE_KEY_NAME}) for signing")
    encrypted = b"ENCRYPTED PRIVATE KEY-----" in data
    if encrypted and not passphrase:
        raise KeyFileError(
            path,
            "is encrypted but no passphrase was given",
            "provide the key's passphrase (--passphrase-env)",
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except ValueError as exc:
        if encrypted:
            raise KeyFileError(path, "wrong passphrase", "provide the passphrase set at keygen") from exc
        raise KeyFileError(
            path, "is not a PEM private key", "pass the file written by `fedtune site keygen`"
        ) from exc
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            path, f"cannot be loaded ({exc})", "regenerate it with `fedtune site keygen`"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(path, f"is a {type(key).__name__}, not Ed25519", "use `fedtune site keygen`")
    if passphrase and not encrypted:
        logger.warning("%s is not encrypted; the passphrase given was not needed", path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        logger.warning("%s is readable by others (mode %o); run: chmod 600 %s", path, mode, path)
    return key


@dataclass(frozen=True)
class SigningKey:
    """A site's ledger key: ``sign`` (bytes -> base64 signature) and the public half to hand out."""

    sign: Callable[[bytes], str]
    public_pem: str
    fingerprint: str


def load_signing_key(private_path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Load a private key with its public PEM and fingerprint.

    Raises
    ------
    FedtuneError
        The file is missing, is a public key, is not Ed25519, or the passphrase is wrong/missing.
    """
    key = _load_private(Path(private_path), passphrase)

    def sign(message: bytes) -> str:
        return base64.b64encode(key.sign(message)).decode("ascii")

    public = key.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return SigningKey(sign, pem.decode("ascii"), public_key_fingerprint(public))


def load_signer(private_path: Path, passphrase: bytes | None = None) -> Callable[[bytes], str]:
    """Load a private key and return ``message bytes -> base64 Ed25519 signature``."""
    return load_signing_key(private_path, passphrase).sign


def load_public_key(public_path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file.

    Raises
    ------
    FedtuneError
        The file is missing, is a private key, or is not an Ed25519 public key.
    """
    path = Path(public_path)
    data = _read(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise KeyFileError(
            path, "is a PRIVATE key", f"verify with the public key ({PUBLIC_KEY_NAME}); keep this file secret"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            path, "is not a PEM public key", f"pass the {PUBLIC_KEY_NAME} written by `fedtune site keygen`"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(path, f"is a {type(key).__name__}, not Ed25519", "use `fedtune site keygen`")
    return key


def load_verifier(public_path: Path) -> Callable[[bytes, str], bool]:
    """Load a public key and return ``(message, base64 signature) -> valid``.

    The verifier returns ``False`` (never raises) for a malformed or wrong signature.
    """
    return verifier_for(load_public_key(public_path))


def public_key_from_pem(text: str) -> Ed25519PublicKey | None:
    """The Ed25519 public key in PEM ``text`` (as a site sends it), or ``None`` if it is not one."""
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError, TypeError):
        return None
    return key if isinstance(key, Ed25519PublicKey) else None


def verifier_for(key: Ed25519PublicKey) -> Callable[[bytes, str], bool]:
    """``(message, base64 signature) -> valid`` for ``key``; never raises for a malformed signature."""

    def verify(message: bytes, signature: str) -> bool:
        try:
            raw = base64.b64decode(signature.encode("ascii"), validate=True)
            key.verify(raw, message)
        except (InvalidSignature, binascii.Error, UnicodeEncodeError, AttributeError, ValueError):
            return False
        return True

    return verify


def public_key_fingerprint(key: Path | Ed25519PublicKey) -> str:
    """SHA-256 hex digest of the 32 raw public key bytes (a PEM file path or a key object)."""
    public = key if isinstance(key, Ed25519PublicKey) else load_public_key(Path(key))
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
