"""Small pure parts of the embedded Flame: endpoint parsing and ``${VAR}`` expansion."""

from __future__ import annotations

from pathlib import Path

import pytest

from flame_magic.embedded.executor import describe_exit, expand_vars
from flame_magic.embedded.server import parse_listen


def test_parse_listen_defaults_to_a_socket_in_the_state_dir(tmp_path: Path) -> None:
    where = parse_listen(None, tmp_path)
    assert where.unix_path == tmp_path / "flame.sock"
    assert where.endpoint == f"unix://{tmp_path}/flame.sock" and where.endpoint.startswith("unix:///")


@pytest.mark.parametrize(
    ("listen", "bind", "endpoint"),
    [
        ("http://127.0.0.1:0", "127.0.0.1:0", "http://127.0.0.1:{port}"),
        ("http://localhost:8080/", "localhost:8080", "http://localhost:{port}"),
        ("http://[::1]:9000", "[::1]:9000", "http://[::1]:{port}"),
        ("https://127.0.0.1:8443", "127.0.0.1:8443", "https://127.0.0.1:{port}"),
        ("unix:///tmp/x.sock", "unix:///tmp/x.sock", "unix:///tmp/x.sock"),
        ("unix:/tmp/x.sock", "unix:///tmp/x.sock", "unix:///tmp/x.sock"),
    ],
)
def test_parse_listen(listen: str, bind: str, endpoint: str, tmp_path: Path) -> None:
    where = parse_listen(listen, tmp_path)
    assert (where.bind, where.endpoint) == (bind, endpoint)


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8080", "unix://relative.sock", "grpc://h:1", "https://h:1/path"]
)
def test_parse_listen_rejects(listen: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        parse_listen(listen, tmp_path)


def test_expand_vars_like_flame() -> None:
    env = {"A": "1", "B": "two"}
    assert expand_vars("${A}-$B-${A}x", env) == "1-two-1x"
    assert expand_vars("${MISSING} $MISSING", env) == "${MISSING} $MISSING"  # left as written
    assert expand_vars("${A}", {"A": "first"}, {"A": "second"}) == "first"


def test_describe_exit() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL (9)"
    assert describe_exit(None) == "still running"
