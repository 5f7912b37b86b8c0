"""Certificates made at test time with the ``openssl`` command, for the TLS tests.

``make_pki(directory)`` writes a CA, a server certificate for 127.0.0.1/localhost, a
client certificate that CA signed, and a second, unrelated CA with its own client
certificate (a client the daemon must refuse). EC P-256 keys: generated in milliseconds.
The same commands work for an operator (docs/metrics-tls.md).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: a client certificate signed by another CA, which the server must not accept
    stranger_cert: Path
    stranger_key: Path
    stranger_ca_cert: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", DAYS,
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_leaf(directory: Path, name: str, ca: tuple[Path, Path], usage: str,
              san: str = "") -> tuple[Path, Path]:
    """A certificate ``name`` signed by ``ca`` with extendedKeyUsage ``usage``
    (serverAuth or clientAuth) and subjectAltName ``san`` if given."""
    cert, key, csr = (directory / f"{name}.crt", directory / f"{name}.key",
                      directory / f"{name}.csr")
    ext = directory / f"{name}.ext"
    ext.write_text(f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", DAYS, "-extfile", str(ext))
    return cert, key


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, "test-ca")
    server = make_leaf(directory, "server", ca, "serverAuth", "IP:127.0.0.1,DNS:localhost")
    client = make_leaf(directory, "prometheus", ca, "clientAuth")
    other_ca = make_ca(directory, "other-ca")
    stranger = make_leaf(directory, "stranger", other_ca, "clientAuth")
    return Pki(ca[0], ca[1], server[0], server[1], client[0], client[1],
               stranger[0], stranger[1], other_ca[0])
