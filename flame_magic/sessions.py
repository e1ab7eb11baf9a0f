"""Which Flame session a cell runs in, and what that session asks Flame for.

A notebook has one default session (one warm runner that keeps its imports between
cells), and more when cells ask for them: resources per instance (Flame's ``resreq``),
several instances for ``--map``, or a name (``--session NAME``). Each distinct request is
a :class:`SessionKey`; the connection opens one Flame session per key and reuses it.
This module only describes and validates requests; it does not talk to Flame.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flame_magic.errors import RequestError
from flame_magic.protocol import types

# Flame's default when a session sets no resreq (1 CPU, 1 GiB, no GPU): fields a cell
# leaves out of a partial request get these, so that `--gpu 1` alone means what it says.
DEFAULT_CPU = 1
DEFAULT_MEMORY = 1024**3
DEFAULT_GPU = 0

MAX_INSTANCES = 10_000

_UNITS = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMGT]i?)?[bB]?\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


def parse_memory(text: str) -> int:
    """Bytes from ``2147483648``, ``512Mi``, ``2Gi``, ``1.5G`` (Kubernetes-style units).

    Raises
    ------
    RequestError
        If the text is not a positive size.
    """
    match = _SIZE.match(text)
    if not match:
        raise RequestError(
            f"--memory takes bytes or a size with a unit (512Mi, 2Gi, 1G; binary Ki/Mi/Gi/Ti, "
            f"decimal k/M/G/T); got {text!r}."
        )
    number, unit = match.group(1), match.group(2) or ""
    size = int(float(number) * _UNITS[unit])
    if size <= 0:
        raise RequestError(f"--memory must be more than 0 bytes; got {text!r}.")
    return size


def parse_count(option: str, text: str, minimum: int, maximum: int | None = None) -> int:
    """A whole number for ``option`` within bounds, or a RequestError saying what is accepted."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise RequestError(f"{option} takes a whole number {bounds}; got {text!r}.")
    return value


def check_name(name: str) -> str:
    """A session name: letters, digits, ``-`` and ``_`` (it becomes part of Flame's session id)."""
    if not _NAME.match(name):
        raise RequestError(
            f"--session takes a name of letters, digits, '-' and '_' (at most 40, starting with a "
            f"letter or digit); got {name!r}."
        )
    return name


def format_memory(size: int) -> str:
    """``512Mi``, ``2Gi``, ``23.5Gi``: exact when it is, one decimal otherwise."""
    for unit, factor in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size >= factor:
            if size % factor == 0:
                return f"{size // factor}{unit}"
            return f"{size / factor:.1f}{unit}"
    return f"{size}"


@dataclass(frozen=True)
class Resources:
    """What one runner instance asks of a node; None leaves a field to Flame's default."""

    cpu: int | None = None
    memory: int | None = None
    gpu: int | None = None

    @property
    def given(self) -> bool:
        return self.cpu is not None or self.memory is not None or self.gpu is not None

    def resreq(self) -> types.ResourceRequirement | None:
        """Flame's ResourceRequirement, or None to let the cluster apply its default."""
        if not self.given:
            return None
        return types.ResourceRequirement(
            cpu=DEFAULT_CPU if self.cpu is None else self.cpu,
            memory=DEFAULT_MEMORY if self.memory is None else self.memory,
            gpu=DEFAULT_GPU if self.gpu is None else self.gpu,
        )

    def describe(self) -> str:
        req = self.resreq()
        if req is None:
            return "Flame's default resources"
        return f"{req.cpu} CPU, {format_memory(req.memory)} memory, {req.gpu} GPU"


def parse_resources(cpu: str | None, memory: str | None, gpu: str | None) -> Resources:
    """Validate ``--cpu``, ``--memory`` and ``--gpu`` as given on the command line."""
    return Resources(
        cpu=None if cpu is None else parse_count("--cpu", cpu, 1, 4096),
        memory=None if memory is None else parse_memory(memory),
        gpu=None if gpu is None else parse_count("--gpu", gpu, 0, 1024),
    )


@dataclass(frozen=True)
class SessionKey:
    """One kind of session a notebook keeps open and reuses.

    Attributes
    ----------
    name
        The user's name for a named session (``--session NAME``), or None.
    instances
        Flame's ``max_instances``: how many runners may serve it at once.
    warm
        Flame's ``min_instances``: runners kept even when idle (their imports stay).
    resources
        What each runner instance asks of a node.
    requirements
        Packages its runners have installed (``--pip``): they run an application of their
        own (see :mod:`flame_magic.environments`).
    """

    name: str | None = None
    instances: int = 1
    warm: int = 1
    resources: Resources = Resources()
    requirements: tuple[str, ...] = ()

    def spec(self, application: str, common_data: bytes) -> types.SessionSpec:
        """The SessionSpec to open this session with."""
        spec = types.SessionSpec(
            application=application,
            common_data=common_data,
            min_instances=self.warm,
            max_instances=self.instances,
            batch_size=1,
        )
        resreq = self.resources.resreq()
        if resreq is not None:
            spec.resreq.CopyFrom(resreq)
        return spec

    def shape(self) -> str:
        """``2 instances, 4 CPU, 8Gi memory, 0 GPU``: what was asked of Flame."""
        plural = "s" if self.instances != 1 else ""
        return f"{self.instances} instance{plural}, {self.resources.describe()}"

    def label(self) -> str:
        """How ``%flame status`` names it."""
        parts = []
        if self.name is not None:
            parts.append(f"named {self.name!r}")
        if self.instances != 1:
            parts.append(f"up to {self.instances} instances")
        if self.resources.given:
            parts.append(self.resources.describe())
        if self.requirements:
            from flame_magic.environments import describe

            parts.append(f"with {describe(self.requirements)}")
        return ", ".join(parts)


DEFAULT = SessionKey()


@dataclass
class SessionInfo:
    """One line of ``%flame status``."""

    session_id: str
    application: str
    state: str
    pending: int
    running: int
    succeed: int
    failed: int
    cancelled: int
    label: str = ""  # e.g. "named 'train', up to 4 instances"; empty for the default session

    @classmethod
    def of(cls, session: types.Session, label: str = "") -> SessionInfo:
        """The line for ``session`` as Flame reports it."""
        status = session.status
        return cls(
            session_id=session.metadata.id,
            application=session.spec.application,
            state=types.SessionState.Name(status.state),
            pending=status.pending,
            running=status.running,
            succeed=status.succeed,
            failed=status.failed,
            cancelled=status.cancelled,
            label=label,
        )


@dataclass
class Closing:
    """What ``%flame close`` did: the sessions closed, and those Flame kept open, with its reason."""

    closed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def fits(resources: Resources, nodes: list[types.Node]) -> str | None:
    """Why no node can hold one instance with ``resources`` (None when one can, or nodes are unknown)."""
    req = resources.resreq()
    if req is None or not nodes:
        return None
    for node in nodes:
        capacity = node.status.capacity
        if capacity.cpu >= req.cpu and capacity.memory >= req.memory and capacity.gpu >= req.gpu:
            return None
    largest = max(
        nodes, key=lambda n: (n.status.capacity.gpu, n.status.capacity.cpu, n.status.capacity.memory)
    )
    cap = largest.status.capacity
    return (
        f"No node of this Flame can hold an instance with {resources.describe()} (largest node "
        f"{largest.metadata.name or '?'}: {cap.cpu} CPU, {format_memory(cap.memory)} memory, {cap.gpu} GPU): "
        "ask for less."
    )


@dataclass
class Plan:
    """Where and how a %%flmrun cell runs, from its options.

    Attributes
    ----------
    key
        The session it runs in (for a private background session: what to open).
    private
        A session of its own, closed when the cell ends (a background cell without --session).
    item, source, items
        ``--map ITEM=SOURCE``: the name each item is bound to, the expression, and its items:
        a list, or an iterator of unknown length (read as the map goes).
    into, return_exceptions
        Where a map's results go, and whether failures take their item's place.
    background
        ``--background HANDLE``: the notebook variable for the handle.
    """

    key: SessionKey
    private: bool = False
    item: str | None = None
    source: str | None = None
    items: list[Any] | Iterator[Any] | None = None
    into: str | None = None
    return_exceptions: bool = False
    background: str | None = None


def plan(
    args: Any,
    namespace: dict[str, Any],
    named: Callable[[str], SessionKey | None],
    default_instances: Callable[[], int],
) -> Plan:
    """Check a cell's options and say where it runs.

    Parameters
    ----------
    args
        The parsed options (``map``, ``into``, ``return_exceptions``, ``session``,
        ``instances``, ``cpu``, ``memory``, ``gpu``, ``background``, ``assign``, ``no_assign``).
    namespace
        The notebook's variables (``--map`` evaluates its iterable there).
    named
        The key of the notebook's open session of that name, if any.
    default_instances
        Instances for a map that does not say.

    Raises
    ------
    RequestError
        For options that do not go together or values that cannot be sent.
    """
    if args.map is None:
        for option, given in (("--into", args.into), ("--return-exceptions", args.return_exceptions)):
            if given:
                raise RequestError(f"{option} goes with --map ITEM=ITERABLE.")
    elif args.background is not None:
        raise RequestError("--map cannot run in the background: run the map in the foreground.")
    elif args.assign is not None or args.no_assign:
        raise RequestError("A --map cell brings back each item's last expression (see --into), not names.")
    if args.instances is not None and args.map is None and args.session is None:
        raise RequestError("--instances goes with --map or --session NAME.")
    resources = parse_resources(args.cpu, args.memory, args.gpu)
    instances = (
        None if args.instances is None else parse_count("--instances", args.instances, 1, MAX_INSTANCES)
    )
    name = None if args.session is None else check_name(args.session)
    result = Plan(key=SessionKey(resources=resources), return_exceptions=args.return_exceptions)
    if args.map is not None:
        _plan_map(result, args.map, args.into, namespace)
    if args.background is not None:
        result.background = _identifier("--background", args.background)
        result.private = name is None
    if name is not None:
        existing = named(name)
        if existing is None:
            count = instances or (default_instances() if result.item is not None else 1)
            result.key = SessionKey(name=name, instances=count, warm=count, resources=resources)
        elif (instances is not None and instances != existing.instances) or (
            resources.given and resources != existing.resources
        ):
            raise RequestError(
                f"Session {name!r} is open with {existing.shape()}: use it without --instances, --cpu, "
                f"--memory and --gpu, or run `%flame close {name}` first to open it anew."
            )
        else:
            result.key = existing
    elif result.item is not None:
        # No warm runner: a map's runners are started for it and released when idle.
        result.key = SessionKey(instances=instances or default_instances(), warm=0, resources=resources)
    return result


def _plan_map(result: Plan, spec: str, into: str | None, namespace: dict[str, Any]) -> None:
    item, equals, source = spec.partition("=")
    if not equals:
        raise RequestError(f"--map takes ITEM=ITERABLE (e.g. --map x=xs); got {spec!r}.")
    result.item = _identifier("--map ITEM=ITERABLE: ITEM", item.strip())
    result.source = source.strip()
    # The user's own expression, in the user's own kernel, like the cell itself.
    try:
        code = compile(result.source, "<--map>", "eval")
    except SyntaxError:
        raise RequestError(
            "--map ITEM=ITERABLE: ITERABLE is a Python expression (xs, range(200), ...); "
            f"got {result.source!r}."
        ) from None
    try:
        value = eval(code, namespace)
    except Exception as exc:
        raise RequestError(f"--map {spec}: {type(exc).__name__}: {exc}") from None
    try:
        items = iter(value)
    except TypeError:
        raise RequestError(
            f"--map {spec}: `{result.source}` ({type(value).__name__}) is not iterable."
        ) from None
    # Sized: read now, and the progress shows a total; otherwise (a generator...) read as the map goes.
    if hasattr(value, "__len__"):
        try:
            result.items = list(items)
        except Exception as exc:
            raise RequestError(f"--map {spec}: reading it raised {type(exc).__name__}: {exc}") from None
    else:
        result.items = items
    result.into = None if into is None else _identifier("--into", into)


_MAP_OPTION = re.compile(r"(?:^|(?<=\s))--map(?:=|\s+)")
_NEXT_OPTION = re.compile(r"\s+--[A-Za-z]")


def take_map_option(line: str) -> tuple[str, str | None]:
    """Split ``--map ITEM=EXPRESSION`` off a %%flmrun line, before the options are parsed.

    The expression is Python (``x=(i for i in range(9))``, ``p=["a b", "c"]``): it runs up to
    the next ``--option`` outside brackets and strings, spaces and quotes kept as written,
    which IPython's option parser would split and keep quoted. One pair of quotes around
    the whole of it is removed.

    Returns
    -------
    tuple
        The line without the option, and ``ITEM=EXPRESSION`` (None when there is no ``--map``).
    """
    match = _MAP_OPTION.search(line)
    if match is None:
        return line, None
    index, depth, quote = match.end(), 0, ""
    while index < len(line):
        char = line[index]
        if quote:
            if char == "\\":
                index += 2
                continue
            if line.startswith(quote, index):
                index += len(quote)
                quote = ""
                continue
        elif char in "\"'":
            quote = line[index : index + 3] if line[index : index + 3] in ('"""', "'''") else char
            index += len(quote)
            continue
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth <= 0 and _NEXT_OPTION.match(line, index):
            break
        index += 1
    spec = line[match.end() : index].strip()
    if not spec:
        return line, None  # the parser says what is missing
    if len(spec) >= 2 and spec[0] in "\"'" and spec[-1] == spec[0] and spec.count(spec[0]) == 2:
        spec = spec[1:-1]
    return line[: match.start()] + line[index:], spec


def _identifier(option: str, text: str) -> str:
    if not text.isidentifier():
        raise RequestError(f"{option} takes a Python name; {text!r} is not one.")
    return text
