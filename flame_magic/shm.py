"""Large values through shared memory, when the notebook and the runner share a host.

A value's out-of-band buffers (and a large pickle) are written to *segments*: files in a
private directory on tmpfs, ``/dev/shm/flame-magic-<uid>`` (0700; each file 0600), named
``<pid>-<random>`` after the process that wrote them. The message carries the segment's
name with the blob's size and SHA-256 digest (``cell.Blob.segment``), and the reader maps
it copy-on-write, so that a value arrives writable with one copy in all (the writer's
``write``) and none in the reader. Segments are written with ``write``, not through a map:
the writer's resident memory does not grow by the value.

Who removes a segment: its reader, as soon as it has mapped it (the map stays valid); its
writer, when its next request begins or the process exits; and at a process's start every
segment whose writing process is gone (a runner or kernel killed with SIGKILL), see
:func:`sweep`.

"Same host" is proven, not assumed: :func:`host_id` is the boot id together with the
device and inode of the private directory, so two processes agree only when they see the
same directory of the same boot (not two containers with the same hostname). A segment is
read only if it is a regular file owned by this user with mode 0600 and the size the
message says; its bytes are checked against the digest before anything is unpickled.

``FLAME_MAGIC_SHM=0`` in the notebook's environment turns shared memory off for both ways
(the notebook then offers no host id, so the runner writes none either): values go through
the object cache. A segment is written only while the file system keeps :data:`RESERVE`
bytes free beside it.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import re
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flame_magic.errors import CacheError

#: Where segments live: tmpfs, shared by the processes of one host.
ROOT = Path("/dev/shm")
#: ``FLAME_MAGIC_SHM=0`` (or ``off``, ``no``, ``false``): never use shared memory.
SWITCH = "FLAME_MAGIC_SHM"
#: Bytes a segment must leave free in the file system (others need /dev/shm too).
RESERVE = 256 * 1024 * 1024
#: ``check(size, read)``: see :func:`open_segment`.
Check = Callable[[int, Callable[[int, int], Any]], None]
_NAME = re.compile(r"^(\d+)-[0-9a-f]{32}$")
_WRITE_CHUNK = 64 * 1024 * 1024
_OFF = {"0", "off", "no", "false"}

_lock = threading.Lock()
_mine: set[str] = set()  # segments this process wrote and has not removed
_swept = False
_host = ""


class SegmentRefused(CacheError):
    """A shared-memory segment is not one this user wrote privately: nothing of it was loaded."""


def enabled() -> bool:
    """Whether the notebook may offer shared memory (``FLAME_MAGIC_SHM``)."""
    return os.environ.get(SWITCH, "").strip().lower() not in _OFF


def directory() -> Path | None:
    """This user's private segment directory, made (0700) if need be; None when unusable.

    The first call in a process also removes stale segments (:func:`sweep`).
    """
    if not ROOT.is_dir():
        return None
    place = ROOT / f"flame-magic-{os.geteuid()}"
    try:
        with contextlib.suppress(FileExistsError):
            place.mkdir(mode=0o700)
        info = os.lstat(place)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
        return None  # someone else's, or not private: never write there
    global _swept
    if not _swept:
        _swept = True
        sweep(place)
    return place


def host_id() -> str:
    """What identifies this host's segments: boot id, and the private directory's device and inode.

    Empty when shared memory is off or unusable here.
    """
    global _host
    if not _host:
        _host = _find_host_id()
    return _host


def _find_host_id() -> str:
    place = directory()
    if place is None:
        return ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        info = os.stat(place)
    except OSError:
        return ""
    return f"{boot}:{info.st_dev}:{info.st_ino}"


def room_for(size: int) -> bool:
    """Whether a segment of ``size`` bytes leaves :data:`RESERVE` free."""
    place = directory()
    if place is None:
        return False
    try:
        fs = os.statvfs(place)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize >= size + RESERVE


def write(data: memoryview) -> str | None:
    """Write ``data`` to a new segment and return its name; None if it does not fit (nothing left)."""
    place = directory()
    if place is None or not room_for(data.nbytes):
        return None
    name = f"{os.getpid()}-{uuid.uuid4().hex}"
    path = place / name
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    with _lock:
        _mine.add(name)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        done = 0
        while done < data.nbytes:
            done += os.write(fd, data[done : done + _WRITE_CHUNK])
    except OSError:  # full after all (another writer was faster): the cache takes it
        remove(name)
        return None
    finally:
        os.close(fd)
    return name


def open_segment(name: str, size: int, check: Check | None = None) -> memoryview:
    """A segment's bytes, mapped copy-on-write (writable; the segment itself never changes).

    ``check(size, read)`` is called first, where ``read(start, end)`` reads the segment
    through the descriptor that is then mapped: what it raises is raised, and nothing is
    mapped. Reading, not the map, leaves the value's pages out of this process until
    they are used.

    Raises
    ------
    SegmentRefused
        If the name is not a segment's, or the file is not a regular file of this user with
        mode 0600 and ``size`` bytes.
    """
    place = directory()
    if place is None or not _NAME.match(name):
        raise SegmentRefused(f"Not loaded: {name!r} is not a shared-memory segment of this host.")
    try:
        fd = os.open(place / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SegmentRefused(
            f"Not loaded: the shared-memory segment {name} cannot be opened ({exc.strerror}); "
            "run the cell again."
        ) from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or mode != 0o600:
            raise SegmentRefused(
                f"Not loaded: the shared-memory segment {name} is not private to this user (mode "
                f"{mode:o}, owner {info.st_uid}; it must be 0600 and yours), so nothing of it was unpickled."
            )
        if info.st_size != size:
            raise SegmentRefused(
                f"Not loaded: the shared-memory segment {name} holds {info.st_size} bytes, not the "
                f"{size} that were sent, so nothing of it was unpickled."
            )
        if check is not None:
            check(size, lambda start, end: os.pread(fd, end - start, start))
        if size == 0:
            return memoryview(bytearray())
        return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
    finally:
        os.close(fd)


def remove(name: str) -> None:
    """Remove a segment (mappings of it stay valid); nothing if it is gone already."""
    with _lock:
        _mine.discard(name)
    place = directory()
    if place is not None and _NAME.match(name):
        with contextlib.suppress(OSError):
            os.unlink(place / name)


def remove_mine() -> None:
    """Remove every segment this process wrote and has not removed (at exit)."""
    with _lock:
        names = list(_mine)
    for name in names:
        remove(name)


def sweep(place: Path | None = None) -> list[str]:
    """Remove the segments whose writing process is gone; return their names."""
    place = place or directory()
    if place is None:
        return []
    removed = []
    for entry in os.scandir(place):
        found = _NAME.match(entry.name)
        if found is None or _alive(int(found.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def segments() -> list[str]:
    """The names of the segments on this host (of this user), for tests and ``%flame status``."""
    place = directory()
    return sorted(e.name for e in os.scandir(place) if _NAME.match(e.name)) if place else []


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


atexit.register(remove_mine)
