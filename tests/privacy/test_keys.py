"""Ed25519 ledger-signing keys: generation, permissions, loading errors, fingerprints."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.errors import FedtuneError
from fedtune.audit_cli import site_app
from privacy.keys import generate_keypair, load_public_key, load_signer, load_verifier, public_key_fingerprint


def test_generate_sign_verify(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    sign, verify = load_signer(private), load_verifier(public)
    signature = sign(b"entry")
    assert verify(b"entry", signature)
    assert not verify(b"entrY", signature)
    assert not verify(b"entry", "not base64 !")
    assert not verify(b"entry", signature[:-4])


def test_never_overwrites_a_key(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path)
    before = private.read_bytes()
    with pytest.raises(FedtuneError, match="already exists"):
        generate_keypair(tmp_path)
    assert private.read_bytes() == before


def test_passphrase(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path, passphrase=b"s3cret")
    assert b"ENCRYPTED PRIVATE KEY" in private.read_bytes()
    assert load_verifier(public)(b"x", load_signer(private, b"s3cret")(b"x"))
    with pytest.raises(FedtuneError, match=r"wrong passphrase.*Fix"):
        load_signer(private, b"nope")
    with pytest.raises(FedtuneError, match="encrypted but no passphrase"):
        load_signer(private)
    with pytest.raises(FedtuneError, match="empty"):
        generate_keypair(tmp_path / "other", passphrase=b"")


def test_wrong_file_types_name_the_file(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path)
    with pytest.raises(FedtuneError, match=f"{public}: is a public key"):
        load_signer(public)
    with pytest.raises(FedtuneError, match="is a PRIVATE key"):
        load_verifier(private)
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(FedtuneError, match="not a PEM public key"):
        load_verifier(junk)
    with pytest.raises(FedtuneError, match="not a PEM private key"):
        load_signer(junk)
    with pytest.raises(FedtuneError, match="not found"):
        load_signer(tmp_path / "missing.pem")


def test_fingerprint(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path)
    fp = public_key_fingerprint(public)
    assert len(fp) == 64 and fp == public_key_fingerprint(load_public_key(public))
    _, other = generate_keypair(tmp_path / "b")
    assert public_key_fingerprint(other) != fp


def test_keygen_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.setenv("SITE_KEY_PASS", "correct horse")
    result = runner.invoke(
        site_app, ["keygen", "--out", str(tmp_path / "k"), "--passphrase-env", "SITE_KEY_PASS"]
    )
    assert result.exit_code == 0, result.output
    assert "fingerprint" in result.output
    load_signer(tmp_path / "k" / "ledger-signing-key.pem", b"correct horse")
    again = runner.invoke(site_app, ["keygen", "--out", str(tmp_path / "k")])
    assert again.exit_code == 2 and "already exists" in again.output
    unset = runner.invoke(
        site_app, ["keygen", "--out", str(tmp_path / "x"), "--passphrase-env", "NOPE_UNSET_VAR"]
    )
    assert unset.exit_code == 2 and "NOPE_UNSET_VAR" in unset.output
