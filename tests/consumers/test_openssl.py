"""OpenSSL 3 with the libp11 engine (libengine-pkcs11-openssl) signing through KeyGrid.

Keys are made in KeyGrid by pkcs11-tool; ``openssl req`` with ``-engine
pkcs11 -keyform engine`` makes a self-signed certificate and a CSR with
them; plain OpenSSL (no engine, no config) then checks both signatures and
that the certificate carries the token's public key. The engine finds the
shim through an OpenSSL config file passed by ``OPENSSL_CONF``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from consumer_kit import SHIM, TOKEN_LABEL, USER_PIN, Consumers

pytestmark = pytest.mark.shim

ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")

OPENSSL_CNF = """\
openssl_conf = openssl_init

[openssl_init]
engines = engine_section

[engine_section]
pkcs11 = pkcs11_section

[pkcs11_section]
engine_id = pkcs11
dynamic_path = {engine}
MODULE_PATH = {module}
init = 0

[req]
distinguished_name = req_dn

[req_dn]
"""


@pytest.fixture(scope="module")
def engine_env(consumer_daemon: Consumers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not ENGINE.exists():
        pytest.fail(f"{ENGINE} is missing: install libengine-pkcs11-openssl (make deps)")
    consumer_daemon.keypair("EC:prime256v1", "ossl-ec", "41")
    consumer_daemon.keypair("RSA:2048", "ossl-rsa", "42")
    cnf = tmp_path_factory.mktemp("openssl") / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF.format(engine=ENGINE, module=SHIM))
    return {**consumer_daemon.env, "OPENSSL_CONF": str(cnf)}


@pytest.mark.parametrize(
    ("label", "key_id", "signature_algorithm"),
    [("ossl-ec", "41", "ecdsa-with-SHA256"), ("ossl-rsa", "42", "sha256WithRSAEncryption")],
)
def test_req_with_engine_key(
    consumer_daemon: Consumers, engine_env: dict[str, str], tmp_path: Path, label: str, key_id: str,
    signature_algorithm: str,
) -> None:  # fmt: skip
    key_uri = f"pkcs11:token={TOKEN_LABEL};object={label};type=private;pin-value={USER_PIN}"
    cert, csr = tmp_path / "cert.pem", tmp_path / "req.pem"
    engine = ["-engine", "pkcs11", "-keyform", "engine", "-key", key_uri, "-subj", f"/CN={label}"]
    consumer_daemon.run(["openssl", "req", "-new", "-x509", "-days", "1", *engine, "-out", str(cert)], env=engine_env)
    consumer_daemon.run(["openssl", "req", "-new", *engine, "-out", str(csr)], env=engine_env)

    plain = {**consumer_daemon.env, "OPENSSL_CONF": "/dev/null"}  # no engine from here on

    def openssl(*args: str) -> str:
        proc = consumer_daemon.run(["openssl", *args], env=plain)
        return proc.stdout + proc.stderr

    text = openssl("x509", "-in", str(cert), "-noout", "-text")
    assert f"Signature Algorithm: {signature_algorithm}" in text
    assert f"Subject: CN = {label}" in text
    assert f"{cert}: OK" in openssl("verify", "-check_ss_sig", "-CAfile", str(cert), str(cert))
    assert "self-signature verify OK" in openssl("req", "-in", str(csr), "-verify", "-noout")

    # The certificate and the CSR carry the token's public key.
    der = tmp_path / "pub.der"
    consumer_daemon.pkcs11_tool("--read-object", "--type", "pubkey", "--id", key_id, "-o", str(der))
    token_pub = openssl("pkey", "-pubin", "-inform", "DER", "-in", str(der))
    assert token_pub.startswith("-----BEGIN PUBLIC KEY-----")
    assert openssl("x509", "-in", str(cert), "-noout", "-pubkey") == token_pub
    assert openssl("req", "-in", str(csr), "-noout", "-pubkey") == token_pub
