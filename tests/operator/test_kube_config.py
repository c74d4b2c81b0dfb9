"""Where the operator's credentials come from (kubetune_operator/kube.py), without a server:
the pod's service-account folder, a kubeconfig with a token file, and what kopf is handed.
Their use against the real API server (a rotated token, CA bundles) is in test_kube_client.py."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import yaml

from kubetune_operator.kube import bearer_token, connection_info, load_config, token_expiry


def jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_token_expiry_is_the_jwt_exp_claim():
    assert token_expiry(jwt({"exp": 1_900_000_000, "sub": "system:serviceaccount:a:b"})) == datetime.fromtimestamp(1_900_000_000, tz=timezone.utc)
    assert token_expiry("not-a-jwt") is None and token_expiry(None) is None
    assert token_expiry(jwt({"sub": "no exp"})) is None


def test_in_cluster_service_account_folder(tmp_path, monkeypatch):
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "token").write_text(jwt({"exp": 1_900_000_000}) + "\n")
    (folder / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (folder / "namespace").write_text("kubetune-system")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    config = load_config(service_account=str(folder))
    info = connection_info(config)
    assert info.server == "https://10.96.0.1:443"
    assert info.ca_path == str(folder / "ca.crt") and info.default_namespace == "kubetune-system"
    assert info.token == jwt({"exp": 1_900_000_000}) and info.expiration == datetime.fromtimestamp(1_900_000_000, tz=timezone.utc)

    # The kubelet rotates the projected token by replacing the file: the next login reads it.
    (folder / "token").write_text(jwt({"exp": 1_900_003_600}))
    assert connection_info(config).token == jwt({"exp": 1_900_003_600})


def test_kubeconfig_with_a_token_file_and_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("first-token\n")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority": "ca.crt"}}],
        "users": [{"name": "u", "user": {"tokenFile": "token"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "jobs"}}],
    }))  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))

    config = load_config()
    info = connection_info(config)
    assert (info.server, info.ca_path, info.token, info.default_namespace) == ("https://127.0.0.1:6443", str(tmp_path / "ca.crt"), "first-token", "jobs")
    (tmp_path / "token").write_text("second-token")
    assert bearer_token(config) == "second-token" and connection_info(config).token == "second-token"


def test_kubeconfig_with_inline_credentials(tmp_path, monkeypatch):
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://api.example:6443", "certificate-authority-data": ca}}],
        "users": [{"name": "u", "user": {"client-certificate-data": "Y2VydA==", "client-key-data": "a2V5"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))

    info = connection_info(load_config())
    assert (info.ca_data, info.certificate_data, info.private_key_data, info.token, info.expiration) == (ca, "Y2VydA==", "a2V5", None, None)
