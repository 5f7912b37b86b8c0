"""metrics.tls in the config: every unusable combination and file is an error that names
the file, line and key and says why (certificates made by the openssl command); a good
one builds the context the server uses; a reload applies it without a restart."""

from __future__ import annotations

import dataclasses
import ssl
import subprocess
import sys

import pytest

from hekitrace.config.settings import default_config, parse_config
from hekitrace.errors import ConfigError
from hekitrace.service.signals import restart_needed
from tests.certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_yaml(**keys: object) -> str:
    body = "".join(f"    {k}: {str(v).lower() if isinstance(v, bool) else v}\n"
                   for k, v in keys.items())
    return "metrics:\n  listen: \"0.0.0.0:9864\"\n  tls:\n" + body


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml")
    return info.value


def test_default_is_plain_http():
    tls = default_config().metrics.tls
    assert not tls.enabled and tls.problem() is None


def test_mutual_tls_config_loads(pki):
    cfg = parse_config(tls_yaml(certfile=pki.server_cert, keyfile=pki.server_key,
                                client_cafile=pki.ca_cert, client_auth_required=True))
    assert cfg.metrics.tls.enabled and cfg.metrics.tls.client_auth_required


@pytest.mark.parametrize("keys, key, line, fragment", [
    ({"keyfile": "KEY"}, "metrics.tls.certfile", 3, "a certificate file to go with keyfile"),
    ({"certfile": "CERT"}, "metrics.tls.keyfile", 3, "the private key file of certfile"),
    ({"client_cafile": "CA"}, "metrics.tls.client_cafile", 4, "client authentication needs TLS"),
    ({"certfile": "CERT", "keyfile": "KEY", "client_auth_required": True},
     "metrics.tls.client_cafile", 3, "the system's public CAs would be trusted"),
    ({"certfile": "CERT", "keyfile": "KEY", "client_cafile": "CA"},
     "metrics.tls.client_auth_required", 3, "clients with no certificate are let in"),
    ({"certfile": "relative.crt", "keyfile": "KEY"}, "metrics.tls.certfile", 4,
     "an absolute path"),
])
def test_unworkable_combinations_name_the_key(pki, keys, key, line, fragment):
    files = {"CERT": pki.server_cert, "KEY": pki.server_key, "CA": pki.ca_cert}
    error = error_of(tls_yaml(**{k: files.get(v, v) if isinstance(v, str) else v
                                 for k, v in keys.items()}))
    assert (error.key, error.line) == (key, line), str(error)
    assert fragment in error.reason and str(error).startswith(f"t.yaml:{line}: {key}: ")


def test_files_that_cannot_be_used_are_errors(pki, tmp_path):
    good = {"certfile": pki.server_cert, "keyfile": pki.server_key}
    cases = [
        ({**good, "keyfile": tmp_path / "absent.key"}, "metrics.tls.keyfile",
         "No such file or directory"),
        ({**good, "certfile": pki.server_key}, "metrics.tls.certfile", "not a PEM certificate"),
        ({**good, "keyfile": pki.server_cert}, "metrics.tls.keyfile", "not a PEM private key"),
        ({**good, "keyfile": pki.client_key}, "metrics.tls.keyfile",
         "does not belong to the certificate"),
        ({**good, "client_cafile": pki.client_cert, "client_auth_required": True},
         "metrics.tls.client_cafile", "holds no CA certificate"),
        ({**good, "client_cafile": pki.client_key, "client_auth_required": True},
         "metrics.tls.client_cafile", "not a PEM CA certificate"),
    ]
    for keys, key, fragment in cases:
        error = error_of(tls_yaml(**keys))
        assert error.key == key and fragment in error.reason, (keys, str(error))
        assert error.line is not None


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(pki, tmp_path):
    locked = tmp_path / "locked.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout",
                    "pass:secret", "-out", str(locked)], check=True, capture_output=True)
    error = error_of(tls_yaml(certfile=pki.server_cert, keyfile=locked))
    assert error.key == "metrics.tls.keyfile" and "encrypted private key" in error.reason


def test_a_directory_instead_of_a_key_is_an_error(pki, tmp_path):
    error = error_of(tls_yaml(certfile=pki.server_cert, keyfile=tmp_path))
    assert error.key == "metrics.tls.keyfile" and "Is a directory" in error.reason


def test_the_context_requires_tls12_and_client_certificates(pki):
    from hekitrace.service.http import tls_context
    cfg = parse_config(tls_yaml(certfile=pki.server_cert, keyfile=pki.server_key,
                                client_cafile=pki.ca_cert, client_auth_required=True))
    ctx = tls_context(cfg.metrics.tls)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    server_only = tls_context(parse_config(tls_yaml(certfile=pki.server_cert,
                                                    keyfile=pki.server_key)).metrics.tls)
    assert server_only is not None and server_only.verify_mode == ssl.CERT_NONE
    assert tls_context(default_config().metrics.tls) is None


def test_a_tls_change_needs_no_restart_but_a_listen_change_does(pki):
    old = default_config()
    tls_on = parse_config(tls_yaml(certfile=pki.server_cert, keyfile=pki.server_key))
    same_listen = dataclasses.replace(tls_on, metrics=dataclasses.replace(
        tls_on.metrics, listen=old.metrics.listen))
    assert restart_needed(old, same_listen) == []
    assert restart_needed(old, tls_on) == ["metrics"]


def test_config_validate_names_a_key_that_does_not_match(pki, tmp_path):
    """``hekitrace config validate`` (what ExecStartPre= or CI runs before a reload)
    catches a renewal that put the wrong key in place, with exit status 3."""
    path = tmp_path / "hekitrace.yaml"
    path.write_text(tls_yaml(certfile=pki.server_cert, keyfile=pki.client_key))
    run = subprocess.run([sys.executable, "-m", "hekitrace.cli", "config", "validate",
                          str(path)], check=False, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 3, run.stderr
    assert f"{path}:5: metrics.tls.keyfile: the private key in {pki.client_key} does not " \
           f"belong to the certificate in {pki.server_cert}" in run.stderr
    assert "Traceback" not in run.stderr
