"""``fedtune deploy provision``: the CA, the SuperLink certificate, node keys and site folders."""

from __future__ import annotations

import ipaddress
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from client.policy import load_policy
from common.errors import ConfigError
from fedtune.deploy_cli import deploy_app
from fedtune.provision import parse_hosts, parse_sites
from privacy.keys import load_signer, load_verifier

SITES = ["hospital-a", "hospital-b"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prov")
    data = root / "data"
    data.mkdir()
    (data / "hospital-a.jsonl").write_text("{}\n")
    out = root / "fed"
    result = CliRunner().invoke(
        deploy_app,
        [
            "provision",
            "--sites",
            ",".join(SITES),
            "--superlink-host",
            "link.example.org,10.1.2.3",
            "--out",
            str(out),
            "--port",
            "9443",
            "--data-dir",
            str(data),
            "--max-epsilon",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "hospital-b.jsonl does not exist yet (edit [data] path" in result.output
    return out


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_server_certificate_chains_to_the_ca_with_sans(fed: Path) -> None:
    ca = x509.load_pem_x509_certificate((fed / "operator" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((fed / "operator" / "superlink.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert ips == {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")}
    for site in SITES:
        assert (fed / "sites" / site / "ca.pem").read_bytes() == (fed / "operator" / "ca.pem").read_bytes()


def test_secrets_are_private_and_only_where_they_belong(fed: Path) -> None:
    assert _mode(fed / "ca" / "ca.key") == 0o600
    assert _mode(fed / "operator" / "superlink.key") == 0o600
    assert not list((fed / "operator").rglob("ca.key"))  # the CA key is not in the operator folder
    for site in SITES:
        d = fed / "sites" / site
        assert _mode(d / "node-auth.key") == 0o600
        assert _mode(d / "keys" / "ledger-signing-key.pem") == 0o600
        assert not list(d.rglob("superlink.key")) and not list(d.rglob("ca.key"))
    operator_files = {p.name for p in (fed / "operator").rglob("*") if p.is_file()}
    assert "node-auth.key" not in operator_files and "ledger-signing-key.pem" not in operator_files


def test_node_keys_are_ecdsa_openssh_as_flower_expects(fed: Path) -> None:
    for site in SITES:
        d = fed / "sites" / site
        private = load_ssh_private_key((d / "node-auth.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        registered = (fed / "operator" / "site-keys" / f"{site}.pub").read_bytes()
        assert registered == (d / "node-auth.pub").read_bytes()
        public = load_ssh_public_key(registered)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.public_numbers() == private.public_key().public_numbers()
    a, b = (fed / "sites" / s / "node-auth.pub" for s in SITES)
    assert a.read_bytes() != b.read_bytes()


def test_site_policy_template_loads_and_signs(fed: Path) -> None:
    for site in SITES:
        d = fed / "sites" / site
        policy = load_policy(d / "policy.toml")
        assert policy.name == site
        assert policy.privacy.max_epsilon == 4.0 and not policy.privacy.allow_non_private
        assert policy.signing_key == (d / "keys" / "ledger-signing-key.pem").resolve()
        assert policy.state_dir == (d / "state").resolve()
        assert policy.data_path.name == f"{site}.jsonl"
        sign = load_signer(policy.signing_key)
        verify = load_verifier(fed / "operator" / "ledger-keys" / f"{site}.pub.pem")
        assert verify(b"entry", sign(b"entry"))
        assert (d / "site.env").read_text() == "SUPERLINK=link.example.org:9443\n"


def test_flower_config_points_at_the_federation(fed: Path) -> None:
    cfg = tomllib.loads((fed / "operator" / "flwr-home" / "config.toml").read_text())
    conn = cfg["superlink"][cfg["superlink"]["default"]]
    assert conn["address"] == "link.example.org:9443"
    root = Path(conn["root-certificates"])
    assert root.is_absolute() and root == (fed / "operator" / "ca.pem").resolve()
    assert "insecure" not in conn
    assert (fed / "operator" / "sites.txt").read_text().split() == SITES


def test_never_overwrites_and_reports_bad_names(fed: Path) -> None:
    runner = CliRunner()
    again = runner.invoke(
        deploy_app, ["provision", "--sites", "x", "--superlink-host", "h", "--out", str(fed)]
    )
    assert again.exit_code != 0 and isinstance(again.exception, ConfigError)
    assert "not empty" in str(again.exception)
    with pytest.raises(ConfigError) as err:
        parse_sites("ok,bad name,ok,")
    text = str(err.value)
    assert "bad name" in text and "repeated: ok" in text
    with pytest.raises(ConfigError):
        parse_sites(" , ")
    assert parse_hosts("10.0.0.5") == ["10.0.0.5", "127.0.0.1", "localhost"]
    with pytest.raises(ConfigError):
        parse_hosts("http://x/")
