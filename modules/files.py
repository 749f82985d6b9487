"""Writing files so that nothing is lost: whole or not at all, and one writer at a time."""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def atomic_write_text(path, text):
    """Write `text` to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def exclusive_output(path):
    """Hold `<path>.lock` while writing `path`, so that a second run given the same output refuses to
    start instead of interleaving its writes. A lock left by a process that no longer runs is taken over."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                owner = int(lock.read_text() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _process_alive(owner) and owner != os.getpid():
                raise UserError(
                    f"another run (process {owner}) is writing {path}; wait for it to finish or choose another output path"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    with os.fdopen(descriptor, "w") as file:
        file.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
