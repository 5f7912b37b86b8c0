"""The real daemon serving /metrics over TLS with client-certificate authentication
(metrics.tls), scraped by a real Prometheus with the shipped rules, certificates made at
test time by the openssl command.

One Prometheus runs three jobs against the daemon: with the client certificate (up),
without one (refused in the handshake), and over plain HTTP (refused with a 400). The
daemon counts both refusals, keeps running and keeps serving; a reload with a key that
does not match is rejected and the old configuration kept; a renewed certificate at the
same path is served after SIGHUP without a restart.
"""

from __future__ import annotations

import signal
import socket
import ssl
import urllib.error
import urllib.request

import pytest

from tests.certs import make_leaf, make_pki
from tests.e2e.daemon_proc import DaemonProcess, metric_value
from tests.e2e.prometheus_proc import PrometheusProcess, wait_until

pytestmark = pytest.mark.e2e


def served_certificate(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.getpeercert(binary_form=True)


def test_prometheus_scrapes_over_mutual_tls_and_others_are_refused(tmp_path):
    pki = make_pki(tmp_path / "pki")
    tls_block = (f"  tls:\n    certfile: {pki.server_cert}\n    keyfile: {pki.server_key}\n"
                 f"    client_cafile: {pki.ca_cert}\n    client_auth_required: true\n")
    client = ssl.create_default_context(cafile=str(pki.ca_cert))
    client.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    daemon = DaemonProcess(metrics_config=tls_block, client_tls=client).start()
    target = f"127.0.0.1:{daemon.port}"
    prom = PrometheusProcess(tmp_path, f"""
  - job_name: mtls
    scheme: https
    tls_config: {{ca_file: {pki.ca_cert}, cert_file: {pki.client_cert}, key_file: {pki.client_key}}}
    static_configs: [{{targets: ["{target}"]}}]
  - job_name: no-client-cert
    scheme: https
    tls_config: {{ca_file: {pki.ca_cert}}}
    static_configs: [{{targets: ["{target}"]}}]
  - job_name: plain-http
    static_configs: [{{targets: ["{target}"]}}]
""")
    try:
        assert f"metrics on https://{target}/metrics" in daemon.stderr()
        wait_until("the mTLS job up", lambda: prom.query('up{job="mtls"} == 1'))
        assert prom.query('hekitrace_ready{job="mtls"} == 1')
        assert prom.query('hekitrace_hook_attached{job="mtls",hook="hypercall"} == 1')

        def refused_jobs() -> dict[str, str] | None:
            errors = {t["labels"]["job"]: t["lastError"] for t in prom.targets()
                      if t["health"] == "down"}
            return errors if set(errors) == {"no-client-cert", "plain-http"} else None

        errors = wait_until("both other jobs down", refused_jobs)
        assert "400 Bad Request" in errors["plain-http"], errors
        # TLS 1.3's certificate_required alert (RFC 8446 section 4.4.2.4)
        assert "tls: certificate required" in errors["no-client-cert"], errors
        assert prom.query('up{job="mtls"} == 1')   # they never were up

        def counted(reason: str):
            return lambda: prom.query(f'hekitrace_clients_refused_total{{job="mtls",'
                                      f'server="metrics",reason="{reason}"}} > 0')
        wait_until("the refused handshakes in Prometheus", counted("tls_client_certificate"))
        wait_until("the plain-HTTP scrapes in Prometheus", counted("not_tls"))

        # a client of our own without a certificate: refused, the daemon unmoved
        no_cert = ssl.create_default_context(cafile=str(pki.ca_cert))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(f"https://{target}/metrics", timeout=10,
                                   context=no_cert).read()
        assert daemon.proc.poll() is None
        assert daemon.http("/healthz")[0] == 200

        # reload with a key that is not the certificate's: rejected, the old one kept
        old_cert = served_certificate(daemon.port, client)
        daemon.config_path.write_text(daemon.base_config.replace(str(pki.server_key),
                                                                 str(pki.client_key)))
        daemon.signal(signal.SIGHUP)
        wait_until("the reload rejected", lambda: "config reload rejected" in daemon.stderr())
        assert "does not belong to the certificate" in daemon.stderr()
        assert metric_value(daemon.metrics(), "hekitrace_config_reload_success") == 0.0
        assert served_certificate(daemon.port, client) == old_cert

        # a renewed certificate at the same paths: served after SIGHUP, no restart
        renewed = make_leaf(tmp_path / "pki", "renewed", (pki.ca_cert, pki.ca_key),
                            "serverAuth", "IP:127.0.0.1")
        pki.server_cert.write_bytes(renewed[0].read_bytes())
        pki.server_key.write_bytes(renewed[1].read_bytes())
        daemon.config_path.write_text(daemon.base_config)
        pid = daemon.proc.pid
        daemon.signal(signal.SIGHUP)
        wait_until("the reload applied", lambda: metric_value(
            daemon.metrics(), "hekitrace_config_reload_success") == 1.0)
        assert "new connections use TLS (client certificates required)" in daemon.stderr()
        assert served_certificate(daemon.port, client) == \
            ssl.PEM_cert_to_DER_cert(renewed[0].read_text())
        assert daemon.proc.pid == pid and daemon.proc.poll() is None
        wait_until("Prometheus scraping after the renewal", lambda: prom.query(
            'hekitrace_config_reload_success{job="mtls"} == 1 and up{job="mtls"} == 1'))
    finally:
        prom.close()
        daemon.close()
