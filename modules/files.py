"""Writing files so that nothing is lost: whole or not at all, and one writer at a time; reading JSON
with one clear message when the file is not what it should be."""
import errno
import json
import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import UserError


UMASK = os.umask(0o022)  # read once, at import (setting it is the only way to read it), and put back
os.umask(UMASK)
# What to do when the operating system refuses a write, by its errno.
REMEDIES = {
    errno.ENOSPC: "free some space on that disk, or write elsewhere",
    errno.EDQUOT: "free some of your disk quota, or write elsewhere",
    errno.EROFS: "that file system is read-only: write elsewhere",
    errno.EACCES: "you may not write in that folder: change its permissions, or write elsewhere",
    errno.EPERM: "you may not write in that folder: change its permissions, or write elsewhere",
}


class WriteRefused(UserError):
    """The operating system refused to write a file (a full disk, a read-only file system, no permission).
    `path` is the file and `os_error` the refusal: a cache (modules/caches.py) goes on without the file."""

    def __init__(self, message, path, os_error):
        super().__init__(message)
        self.path, self.os_error = Path(path), os_error


def write_error(path, error, elsewhere="another --out"):
    """The WriteRefused for an OSError met while writing `path`: the path, the cause and the remedy
    (`elsewhere` says how to write elsewhere)."""
    cause = error.strerror or str(error)
    remedy = REMEDIES.get(error.errno, "check that disk, or write elsewhere")
    return WriteRefused(f"could not write {path}: {cause}; {remedy} ({elsewhere}). Any earlier {Path(path).name} "
                        "is unchanged", path, error)


def os_error_in(error):
    """The OSError `error` is or stands for: torch.save reports a failed write (a full disk) as a
    RuntimeError of its zip writer raised while handling the OSError."""
    while error is not None and not isinstance(error, OSError):
        error = (error.__cause__ or error.__context__) if isinstance(error, RuntimeError) else None
    return error


@contextmanager
def atomic_file(path, mode="wb", elsewhere="another --out"):
    """Open a temporary file beside `path` for writing; when the block ends, flush it to disk and rename
    it over `path`. A reader (or a crash, or a full disk) sees the old file or the new one, never half
    of one; if the block fails, `path` is untouched and the temporary file is gone. When the operating
    system refuses the write (a full disk, a read-only file system, no permission) the error is a
    UserError naming the path, the cause and the remedy, `elsewhere` saying how to write elsewhere."""
    path = Path(path)
    temporary, in_block = None, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(temporary, 0o666 & ~UMASK)  # mkstemp's file is its owner's alone; the file is as open() makes it
        with os.fdopen(descriptor, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as file:
            in_block = True
            yield file
            in_block = False
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            with suppress(OSError):
                Path(temporary).unlink(missing_ok=True)
        # Inside the block, an error of another file (an input the block reads) stays that file's.
        cause = os_error_in(error)
        if cause is not None and (not in_block or cause.filename in (None, temporary, str(path))):
            raise write_error(path, cause, elsewhere) from None
        raise


def atomic_write_text(path, text, elsewhere="another --out"):
    """Write `text` (UTF-8) to `path` whole or not at all (see atomic_file)."""
    with atomic_file(path, "w", elsewhere) as file:
        file.write(text)


def read_json(path, what, json_lines=False, expect=None):
    """The JSON value in the file at `path`; a missing, non-UTF-8 or malformed file, or one whose value is
    not of the type `expect` (dict or list, when given), ends in a UserError that says what the file should
    have been (`what`, e.g. "a list of answers from evaluate_responses.py").
    With `json_lines`, a file of JSON Lines (one value per line: named .jsonl, or not one JSON document
    but starting with "{") gives the list of its values: a .jsonl of one line is a list of one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; it should be {what}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}); it should be {what}") from None
    except OSError as error:
        raise UserError(f"could not read {path}: {error.strerror or error}; it should be {what}") from None
    value = _json_value(path, text, what, json_lines)
    if expect is not None and not isinstance(value, expect):
        raise UserError(f"{path} holds a JSON {type(value).__name__}; it should be {what}")
    return value


def _json_value(path, text, what, json_lines):
    if json_lines and path.suffix == ".jsonl":
        return _json_lines_values(path, text, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if not (json_lines and text.lstrip().startswith("{")):
            raise UserError(f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                            f"it should be {what}") from None
    except RecursionError:
        raise UserError(f"{path} nests its JSON too deeply to read; it should be {what}") from None
    return _json_lines_values(path, text, what)


def _json_lines_values(path, text, what):
    values = []
    # Only "\n" ends a line: JSON strings may hold U+2028 and the other breaks str.splitlines knows.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as error:
                reason = getattr(error, "msg", "nested too deeply")
                raise UserError(f"{path} line {number} is not valid JSON ({reason}); it should be {what}, "
                                "one value per line") from None
    return values


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
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
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
        except OSError as error:
            raise write_error(path, error) from None
    with os.fdopen(descriptor, "w") as file:
        file.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
