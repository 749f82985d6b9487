"""Caches are optional: a file the project keeps only to go faster next time (a corpus's tokens, a downloaded
data set, compiled programs) never stops a run because it cannot be written.

A cache belongs beside what it caches, where a user finds it. When the operating system refuses that (a
read-only mount, a folder that is not ours, a full disk), the cache goes to the user's cache folder, under
the same path (`~/.cache/gpt2-from-scratch/<the path>`, or $XDG_CACHE_HOME's), and when that is refused too
the work goes on without it. Either way one line says so. Only what the user asked for (a checkpoint,
metrics, answers, scores) stops a run that cannot write it (modules/files.py).
"""
import os
import sys
import tempfile
from pathlib import Path

from .files import WriteRefused

PROJECT_FOLDER = Path(__file__).resolve().parents[1]


def user_cache_folder():
    """The user's cache folder for this project: $XDG_CACHE_HOME/gpt2-from-scratch, else ~/.cache/...."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-from-scratch"


def cache_paths(path):
    """Where a cache at `path` may be kept, best first: there, then at the same path in the user's cache
    folder (the whole path, so that two data sets of the same name keep their own caches)."""
    path = Path(path).absolute()
    return [path, user_cache_folder().joinpath(*path.parts[1:])]


def write_cache(path, write, what, required=False):
    """Call `write(location)`, which writes the cache at `location` or raises WriteRefused, for each of
    cache_paths(path) until one is written; returns it, or None when the operating system refused them all
    (raises the first refusal when the work cannot go on without the file: `required`). `what` names the
    cache in the line that says where it went instead ("the tokens of corpus.txt")."""
    first_refusal = None
    for location in cache_paths(path):
        try:
            write(location)
        except WriteRefused as refused:
            first_refusal = first_refusal or refused
            continue
        if first_refusal:
            note(f"{what} could not be cached in {first_refusal.path.parent} ({first_refusal.os_error.strerror}); "
                 f"cached in {location.parent} instead")
        return location
    if required:
        raise first_refusal
    note(f"{what} could not be cached ({first_refusal.os_error.strerror} in {first_refusal.path.parent}, and in "
         f"{user_cache_folder()}); going on without the cache")
    return None


def use_compile_cache():
    """Point inductor's on-disk caches (compiled programs, found again by the next run) at the project's
    .cache/torch-compile, else the user's cache folder, else a temporary folder; a folder the user chose
    with TORCHINDUCTOR_CACHE_DIR comes first. Call it before anything compiles: inductor fixes its folder
    the first time it is asked. Returns the folder, or None when none can be written: then nothing can be
    compiled (inductor writes the programs it builds), and the caller runs its code uncompiled."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    candidates = ([Path(chosen)] if chosen else []) + [
        PROJECT_FOLDER / ".cache" / "torch-compile", user_cache_folder() / "torch-compile",
        Path(tempfile.gettempdir()) / "gpt2-from-scratch-torch-compile"]
    first_refusal = None
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            first_refusal = first_refusal or error
            continue
        if first_refusal:
            note(f"compiled programs could not be cached in {candidates[0]} ({first_refusal.strerror}); "
                 f"cached in {folder} instead")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        return folder
    note(f"compiled programs could not be cached ({first_refusal.strerror} in {', '.join(map(str, candidates))}); "
         "running uncompiled")
    return None


def note(message):
    """One line about a cache, on stderr so that it never mixes with what a script prints for a program."""
    print(f"note: {message}", file=sys.stderr, flush=True)
