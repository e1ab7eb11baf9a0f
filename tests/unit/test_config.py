"""Which Flame a notebook uses: the same conventions as flamepy and flmctl."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flame_magic.config import EMBEDDED, ConfigError, resolve, target_for


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FLAME_ENDPOINT", raising=False)
    monkeypatch.delenv("FLAME_CA_FILE", raising=False)
    return tmp_path


def write(home: Path, document: dict) -> None:
    (home / ".flame").mkdir(exist_ok=True)
    (home / ".flame" / "flame.yaml").write_text(yaml.safe_dump(document))


PROD_CA = "/etc/prod-ca.pem"
CONFIG = {
    "current-context": "prod",
    "contexts": [
        {
            "name": "prod",
            "cluster": {"endpoint": "https://prod:8080", "tls": {"ca_file": "/etc/prod-ca.pem"}},
        },
        {"name": "lab", "cluster": {"endpoint": "http://lab:8080"}},
    ],
}


def test_nothing_configured_means_the_embedded_flame(home: Path) -> None:
    assert resolve() == EMBEDDED


def test_current_context_then_environment_overrides(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(home, CONFIG)
    assert (resolve().endpoint, resolve().ca_file) == ("https://prod:8080", "/etc/prod-ca.pem")
    # As flamepy: FLAME_ENDPOINT replaces the endpoint and keeps the context's CA...
    monkeypatch.setenv("FLAME_ENDPOINT", "https://other:8080")
    assert (resolve().endpoint, resolve().ca_file, resolve().source) == (
        "https://other:8080",
        "/etc/prod-ca.pem",
        "FLAME_ENDPOINT",
    )
    # ...and FLAME_CA_FILE replaces the CA.
    monkeypatch.setenv("FLAME_CA_FILE", "/tmp/ca.pem")
    assert resolve().ca_file == "/tmp/ca.pem"
    assert target_for("prod").ca_file == "/tmp/ca.pem"


def test_connect_takes_an_endpoint_or_a_context(home: Path) -> None:
    write(home, CONFIG)
    assert target_for("lab").endpoint == "http://lab:8080"
    assert target_for("lab").source.startswith("context 'lab' in ")
    assert target_for("prod", "/mine.pem").ca_file == "/mine.pem"
    direct = target_for("https://x:8443")
    assert (direct.endpoint, direct.ca_file, direct.source) == (
        "https://x:8443",
        "/etc/prod-ca.pem",
        "%flame connect",
    )
    assert target_for("prod", "/mine.pem").context == "prod"  # its cache section still applies
    assert target_for("127.0.0.1:1").endpoint == "http://127.0.0.1:1"
    assert target_for("[::1]:8080").endpoint == "http://[::1]:8080"
    with pytest.raises(ConfigError, match=r"'nope' is neither an endpoint nor a context .*: lab, prod\)"):
        target_for("nope")


def test_a_broken_config_does_not_stop_an_explicit_endpoint(home: Path) -> None:
    (home / ".flame").mkdir()
    (home / ".flame" / "flame.yaml").write_text("contexts: [unclosed")
    assert target_for("http://h:1").endpoint == "http://h:1"
    assert target_for("h:1").endpoint == "http://h:1"
    with pytest.raises(ConfigError, match="Cannot read"):
        resolve()
