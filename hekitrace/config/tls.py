"""Build the metrics endpoint's TLS server context from ``metrics.tls``, or say why not.

Why Python's ``ssl`` module: it is the standard library's binding of the system OpenSSL
(security fixes come with the distribution's openssl and python3 packages), it offers
non-blocking handshakes on a socket the daemon's own selector watches, and it is what
prometheus_client's ``start_http_server(certfile=...)`` uses. No other TLS code.

The context is built at config load (so ``hekitrace config validate``, start-up and
SIGHUP reject a bad file with its key and line) and again by the HTTP server, which
rebuilds it on every reload so a renewed certificate is served without a restart.
Every failure is a ConfigError naming the ``metrics.tls`` key and the file.
"""

from __future__ import annotations

import ssl

from hekitrace.config.metrics_endpoint import TlsConfig
from hekitrace.errors import ConfigError

#: A PEM certificate, key or CA bundle larger than this is not one (a chain of a few
#: certificates is under 10 KiB); bounded so a wrong path (a disk image) is not read whole.
MAX_PEM_BYTES = 1 << 20


class _PassphraseAsked(Exception):
    """OpenSSL asked for the key's passphrase (the key is encrypted)."""


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal and block the daemon.
    raise _PassphraseAsked


def _read_pem(path: str, key: str, marker: str, what: str) -> str:
    """The text of PEM file ``path``; ConfigError when unreadable or when no ``marker``
    block ("CERTIFICATE", "PRIVATE KEY") is in it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PEM_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}", key=key) from None
    if len(data) > MAX_PEM_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_PEM_BYTES} bytes: not {what}", key=key)
    text = data.decode("ascii", errors="replace")
    if f"{marker}-----" not in text:
        raise ConfigError(f"{path} is not {what} (no '-----BEGIN ...{marker}-----' block)",
                          key=key)
    return text


def server_context(tls: TlsConfig, prefix: str = "metrics.tls") -> ssl.SSLContext:
    """The server-side context for ``tls`` (which must be enabled): TLS 1.2 or later,
    the certificate chain and key loaded and matched, and with ``client_cafile`` every
    client required to present a certificate that CA signed."""
    if tls.certfile is None or tls.keyfile is None:
        raise ConfigError("certfile and keyfile are both needed for TLS", key=prefix)
    problem = tls.problem()
    if problem is not None:
        raise ConfigError(f"expected {problem[1]}", key=f"{prefix}.{problem[0]}")
    cert_key, key_key = f"{prefix}.certfile", f"{prefix}.keyfile"
    _read_pem(tls.certfile, cert_key, "CERTIFICATE", "a PEM certificate")
    key_text = _read_pem(tls.keyfile, key_key, "PRIVATE KEY", "a PEM private key")
    if "ENCRYPTED" in key_text:
        raise ConfigError(f"{tls.keyfile} is an encrypted private key: expected an "
                          "unencrypted one (the daemon cannot ask for a passphrase; "
                          "protect it with file mode 0600 instead)", key=key_key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.0 and 1.1 are deprecated (RFC 8996); Prometheus speaks 1.2 and 1.3
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile, password=_no_passphrase)
    except _PassphraseAsked:
        raise ConfigError(f"{tls.keyfile} is an encrypted private key: expected an "
                          "unencrypted one", key=key_key) from None
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"the private key in {tls.keyfile} does not belong to the "
                              f"certificate in {tls.certfile}", key=key_key) from None
        raise ConfigError(f"OpenSSL cannot load the certificate {tls.certfile} with the key "
                          f"{tls.keyfile}: {error.reason or error}", key=cert_key) from None
    except OSError as error:
        raise ConfigError(f"cannot read {tls.certfile} or {tls.keyfile}: "
                          f"{error.strerror or error}", key=cert_key) from None
    if tls.client_cafile is not None:
        ca_key = f"{prefix}.client_cafile"
        ca_text = _read_pem(tls.client_cafile, ca_key, "CERTIFICATE", "a PEM CA certificate")
        try:
            ctx.load_verify_locations(cadata=ca_text)
        except ssl.SSLError as error:
            raise ConfigError(f"OpenSSL cannot load the CA certificates in "
                              f"{tls.client_cafile}: {error.reason or error}",
                              key=ca_key) from None
        if not ctx.cert_store_stats()["x509_ca"]:
            raise ConfigError(f"{tls.client_cafile} holds no CA certificate (basic "
                              "constraints CA:TRUE): it cannot sign client certificates",
                              key=ca_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
