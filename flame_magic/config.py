"""Where the Flame cluster is: the same conventions as Flame's own tools.

``FLAME_ENDPOINT`` (and ``FLAME_CA_FILE``) win; otherwise ``~/.flame/flame.yaml``
names a ``current-context`` among its ``contexts``; with neither, the notebook
runs on an embedded Flame on this machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """The Flame configuration cannot be used as written."""


@dataclass(frozen=True)
class Target:
    """A Flame to run cells on.

    Attributes
    ----------
    endpoint
        ``http://host:port``, ``https://host:port`` or ``unix:///path``; empty
        for the embedded Flame, which picks its own private endpoint.
    ca_file
        CA certificate for ``https://`` endpoints (system roots when None).
    source
        Where the choice came from, for ``%flame status`` and error messages.
    """

    endpoint: str
    ca_file: str | None
    source: str

    @property
    def embedded(self) -> bool:
        return not self.endpoint


EMBEDDED = Target(endpoint="", ca_file=None, source="embedded Flame (no cluster configured)")


def config_path() -> Path:
    return Path(os.environ.get("HOME", str(Path.home()))) / ".flame" / "flame.yaml"


def read_contexts(path: Path) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """Return ``current-context`` and the contexts by name from a flame.yaml."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} is not a mapping with `current-context` and `contexts`.")
    contexts = {}
    for entry in document.get("contexts") or []:
        if isinstance(entry, dict) and entry.get("name"):
            contexts[str(entry["name"])] = entry
    return document.get("current-context"), contexts


def context_target(name: str, path: Path | None = None) -> Target:
    """The cluster named ``name`` in flame.yaml, with FLAME_CA_FILE applied."""
    path = path or config_path()
    _, contexts = read_contexts(path)
    if name not in contexts:
        known = ", ".join(sorted(contexts)) or "none"
        raise ConfigError(f"No context {name!r} in {path} (contexts: {known}).")
    cluster = contexts[name].get("cluster") or {}
    endpoint = cluster.get("endpoint")
    if not endpoint:
        raise ConfigError(f"Context {name!r} in {path} has no cluster.endpoint.")
    ca_file = os.environ.get("FLAME_CA_FILE") or (cluster.get("tls") or {}).get("ca_file")
    return Target(endpoint=str(endpoint), ca_file=ca_file, source=f"context {name!r} in {path}")


def resolve() -> Target:
    """The Flame this notebook should use when the user has not said."""
    endpoint = os.environ.get("FLAME_ENDPOINT")
    if endpoint:
        return Target(endpoint=endpoint, ca_file=os.environ.get("FLAME_CA_FILE"), source="FLAME_ENDPOINT")
    path = config_path()
    if path.exists():
        current, _ = read_contexts(path)
        if not current:
            raise ConfigError(f"{path} sets no current-context: set one, or run `%flame connect ENDPOINT`.")
        return context_target(str(current), path)
    return EMBEDDED
