"""``python -m flame_magic.embedded`` / ``flame-embedded``: run an embedded Flame.

Prints ``FLAME_ENDPOINT=<endpoint>`` to stdout once it serves, then the object cache's
``FLAME_CACHE_ENDPOINT=...`` and ``FLAME_CACHE_STORAGE=...``, and nothing more; logs go
to stderr. SIGTERM or SIGINT stop it, and every application process with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="flame-embedded",
        description=(
            "A single-machine Flame: serves flame.v1.Frontend and runs application processes "
            "as Flame's Host shim does. Prints FLAME_ENDPOINT=<endpoint> when ready."
        ),
    )
    parser.add_argument(
        "--listen",
        metavar="ENDPOINT",
        help="http://127.0.0.1:PORT (PORT 0 picks a free port), https://HOST:PORT (with --tls-cert "
        "and --tls-key) or unix:///path/to.sock (default: a Unix socket in the state directory)",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain) for https://")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument(
        "--working-directory",
        metavar="DIR",
        default=os.getcwd(),
        help="working directory of flame-magic's runner, application flame-magic "
        "(default: the current directory)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="directory for sockets, logs and per-executor directories "
        "(default: a fresh private temporary directory)",
    )
    parser.add_argument(
        "--keep-state", action="store_true", help="leave the state directory (with logs) behind on exit"
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit, stopping every application process, when the parent process dies",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        metavar="PID",
        help="with --exit-with-parent: the process to watch (default: our parent at start)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level for stderr (default: INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the embedded Flame until it is told to stop; return the exit status."""
    # Taken before the slow imports below, so a parent that dies meanwhile is noticed.
    parent = os.getppid()
    import asyncio

    from flame_magic.embedded.server import serve

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s flame-embedded[%(process)d] %(name)s: %(message)s",
    )
    workdir = os.path.abspath(args.working_directory)
    if not os.path.isdir(workdir):
        print(f"flame-embedded: working directory does not exist: {workdir}", file=sys.stderr)
        return 2

    tls = None
    if args.tls_cert or args.tls_key:
        try:
            with open(args.tls_key, "rb") as key, open(args.tls_cert, "rb") as cert:
                tls = (key.read(), cert.read())
        except (OSError, TypeError) as err:
            print(f"flame-embedded: cannot read --tls-cert and --tls-key: {err}", file=sys.stderr)
            return 2

    def ready(endpoint: str, variables: dict[str, str]) -> None:
        lines = [f"FLAME_ENDPOINT={endpoint}", *(f"{name}={value}" for name, value in variables.items())]
        sys.stdout.write("".join(f"{line}\n" for line in lines))  # one write: read to its end
        sys.stdout.flush()
        # Nothing else goes to stdout: a parent may stop reading the pipe after this line.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

    try:
        asyncio.run(
            serve(
                listen=args.listen,
                working_directory=workdir,
                state_dir=args.state_dir,
                keep_state=args.keep_state,
                parent_pid=(args.parent_pid or parent) if args.exit_with_parent else None,
                on_ready=ready,
                tls=tls,
            )
        )
    except (ValueError, RuntimeError) as err:
        print(f"flame-embedded: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
