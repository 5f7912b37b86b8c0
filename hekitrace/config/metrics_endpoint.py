"""The ``metrics`` section: where the endpoint listens and whether it speaks TLS.

Why a module of its own: ``metrics.listen`` and ``metrics.tls`` are the only settings
that decide who can reach the daemon over the network, so their rules (address syntax,
which TLS keys need which) are kept together and apart from the rest of the schema.
The TLS files themselves are read by :mod:`hekitrace.config.tls`.

The TLS key names are those of prometheus_client's own ``start_http_server(certfile=,
keyfile=, client_cafile=, client_auth_required=)``
(https://prometheus.github.io/client_python/exporting/http/, "HTTPS"), so an operator
who knows one knows the other.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from hekitrace.config.schema import absolute_path, one_of, setting, subsection


def split_listen(v: str) -> tuple[str, int]:
    """``IP:PORT``, ``[IPv6]:PORT``, ``localhost:PORT`` or ``:PORT`` (every address: host
    ``""``) -> (host, port); port 0 asks the kernel for a free one (tests).

    The one parser of ``metrics.listen``: the config check and the HTTP server both use
    it. ValueError says what was expected.
    """
    if v.startswith("["):
        host, sep, port = v[1:].partition("]:")
    else:
        host, sep, port = v.rpartition(":")
        if ":" in host:
            raise ValueError("an IPv6 address in brackets, e.g. [::1]:9864")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("HOST:PORT with a port 0-65535 (e.g. 127.0.0.1:9864, [::1]:9864, "
                         ":9864 for every address)")
    if host and host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("an IP address, localhost or nothing before the port") from None
    return host, int(port)


def listen_address(v: Any) -> str | None:
    """The config check of ``metrics.listen`` (:func:`split_listen`)."""
    try:
        split_listen(v)
    except ValueError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class TlsConfig:
    """HTTPS on the metrics port. All null (the default): plain HTTP.

    ``certfile`` and ``keyfile`` (PEM) turn TLS on; ``client_cafile`` with
    ``client_auth_required: true`` makes every client show a certificate signed by that
    CA (mutual TLS), which is the access control; TLS alone only hides and authenticates
    the server.
    """
    certfile: str | None = setting(None, str, absolute_path, True)
    keyfile: str | None = setting(None, str, absolute_path, True)
    client_cafile: str | None = setting(None, str, absolute_path, True)
    client_auth_required: bool = setting(False, bool)

    @property
    def enabled(self) -> bool:
        return self.certfile is not None

    def problem(self) -> tuple[str, str] | None:
        """(key, what is wrong) for a combination that cannot work, else None.

        Two departures from prometheus_client, both to fail closed: it falls back to the
        system's CA store when ``client_auth_required`` comes without a CA (any client
        certificate from a public CA would then get in), and it ignores a
        ``client_cafile`` without ``client_auth_required`` (clients without a
        certificate would get in while the file suggests otherwise). Here both are
        errors.
        """
        if self.certfile is None and self.keyfile is not None:
            return "certfile", "a certificate file to go with keyfile"
        if self.certfile is not None and self.keyfile is None:
            return "keyfile", "the private key file of certfile (PEM)"
        if not self.enabled and (self.client_cafile is not None or self.client_auth_required):
            key = "client_cafile" if self.client_cafile is not None else "client_auth_required"
            return key, "certfile and keyfile as well: client authentication needs TLS"
        if self.client_auth_required and self.client_cafile is None:
            return "client_cafile", ("the CA file that signs client certificates: with "
                                     "client_auth_required and no CA, the system's public "
                                     "CAs would be trusted")
        if self.client_cafile is not None and not self.client_auth_required:
            return "client_auth_required", ("true with client_cafile (without it, clients "
                                            "with no certificate are let in)")
        return None


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = setting("127.0.0.1:9864", str, listen_address)
    vm_label: str = setting("name", str, one_of("name", "uuid", "pid"))
    tls: TlsConfig = subsection(TlsConfig)
