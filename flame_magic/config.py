"""Where the Flame cluster is: the same conventions as Flame's own tools.

``FLAME_ENDPOINT`` (and ``FLAME_CA_FILE``) win; otherwise ``~/.flame/flame.yaml``
names a ``current-context`` among its ``contexts``; with neither, the notebook
runs on an embedded Flame on this machine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from flame_magic.errors import ConfigError


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
    context
        The flame.yaml context it came from, if any (its ``cache`` section applies).
    """

    endpoint: str
    ca_file: str | None
    source: str
    context: str | None = None

    @property
    def embedded(self) -> bool:
        return not self.endpoint


# `%flame connect HOST:PORT`: a host name or IPv4 address, or an IPv6 one in brackets.
_HOST_PORT = re.compile(r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$")

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
    return Target(endpoint=str(endpoint), ca_file=ca_file, source=f"context {name!r} in {path}", context=name)


def resolve() -> Target:
    """The Flame this notebook should use when the user has not said."""
    endpoint = os.environ.get("FLAME_ENDPOINT")
    if endpoint:
        return Target(endpoint=endpoint, ca_file=_ca_for_endpoint(), source="FLAME_ENDPOINT")
    path = config_path()
    if path.exists():
        current, _ = read_contexts(path)
        if not current:
            raise ConfigError(f"{path} sets no current-context: set one, or run `%flame connect ENDPOINT`.")
        return context_target(str(current), path)
    return EMBEDDED


def target_for(name: str, ca_file: str | None = None) -> Target:
    """The Flame named by ``%flame connect``: an endpoint or a context name.

    Parameters
    ----------
    name
        ``http://HOST:PORT``, ``https://HOST:PORT``, ``unix:///PATH``, ``HOST:PORT`` (read as
        ``http://HOST:PORT``), or the name of a context in ``~/.flame/flame.yaml``. A name is a
        context only when flame.yaml has a context of that name.
    ca_file
        CA certificate for ``https://``; by default ``FLAME_CA_FILE``, then the context's (or
        for an endpoint, the current context's) ``tls.ca_file``, as Flame's own tools do.

    Raises
    ------
    ConfigError
        For a name that is neither an endpoint nor a context, listing the contexts there are.
    """
    if "://" in name or name.startswith("unix:"):
        return Target(endpoint=name, ca_file=ca_file or _ca_for_endpoint(), source="%flame connect")
    path = config_path()
    contexts: dict[str, dict[str, Any]] = {}
    if path.exists():
        try:
            _, contexts = read_contexts(path)
        except ConfigError:
            if not _HOST_PORT.match(name):
                raise  # an endpoint given as HOST:PORT need not be stopped by a broken file
    if name in contexts:
        target = context_target(name, path)
        return replace(target, ca_file=ca_file) if ca_file else target
    if _HOST_PORT.match(name):
        return Target(
            endpoint=f"http://{name}", ca_file=ca_file or _ca_for_endpoint(), source="%flame connect"
        )
    if contexts:
        known = f"the contexts of {path} are: {', '.join(sorted(contexts))}"
        choices = "one of those contexts"
    else:
        known = f"{path} has no contexts" if path.exists() else f"there is no {path}"
        choices = "the name of a context of flame.yaml"
    raise ConfigError(
        f"{name!r} is neither an endpoint nor a context ({known}). Give HOST:PORT, a URL "
        f"(http://HOST:PORT, https://HOST:PORT, unix:///PATH) or {choices}."
    )


def _ca_for_endpoint() -> str | None:
    """The CA for an endpoint given without a context: FLAME_CA_FILE, else the current context's.

    flamepy keeps the current context's ``tls.ca_file`` when ``FLAME_ENDPOINT`` overrides
    the endpoint; so do we, so that one configuration serves both.
    """
    ca_file = os.environ.get("FLAME_CA_FILE")
    if ca_file:
        return ca_file
    path = config_path()
    if not path.exists():
        return None
    try:
        current, contexts = read_contexts(path)
    except ConfigError:
        return None  # an endpoint was given explicitly: a broken file need not stop it
    cluster = (contexts.get(str(current)) or {}).get("cluster") or {}
    return (cluster.get("tls") or {}).get("ca_file")


@dataclass(frozen=True)
class CacheTarget:
    """Flame's object cache, where values too large for a task travel.

    Attributes
    ----------
    endpoint
        ``grpc://HOST:PORT``, ``grpcs://HOST:PORT`` or ``grpc+unix:///PATH``.
    ca_file
        CA certificate for ``grpcs://``.
    storage
        The cache's storage directory, when this machine shares it (flamepy's ``cache.storage``):
        objects are then written and mapped as files instead of streamed.
    source
        Where the choice came from.
    """

    endpoint: str
    ca_file: str | None
    storage: str | None
    source: str


def resolve_cache(context: str | None = None) -> CacheTarget | None:
    """The object cache of a cluster: ``FLAME_CACHE_ENDPOINT``, else the context's ``cache``.

    Parameters
    ----------
    context
        The flame.yaml context the cluster came from; None for the current context (as
        flamepy does when ``FLAME_ENDPOINT`` names the cluster).

    Returns
    -------
    CacheTarget or None
        None when no cache is configured: Flame's default (``grpc://127.0.0.1:9090``) is not
        assumed, so that a missing cache is reported as such rather than as unreachable.
    """
    section: dict[str, Any] = {}
    path = config_path()
    if path.exists():
        try:
            current, contexts = read_contexts(path)
        except ConfigError:
            current, contexts = None, {}
        section = (contexts.get(str(context or current)) or {}).get("cache") or {}
        if not isinstance(section, dict):
            section = {"endpoint": section} if isinstance(section, str) else {}
    found = os.environ.get("FLAME_CACHE_STORAGE") or section.get("storage")
    storage = str(found) if found else None
    ca_file = (section.get("tls") or {}).get("ca_file") or os.environ.get("FLAME_CA_FILE")
    endpoint = os.environ.get("FLAME_CACHE_ENDPOINT")
    if endpoint:
        return CacheTarget(endpoint, ca_file, storage, "FLAME_CACHE_ENDPOINT")
    if section.get("endpoint"):
        where = f"context {context or current!r} in {path}"
        return CacheTarget(str(section["endpoint"]), ca_file, storage, where)
    return None
