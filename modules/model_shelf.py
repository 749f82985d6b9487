"""The models a server holds for all its sessions (the app's classroom): each loaded once, at most a few
at once, and a request that does not fit told so in one message rather than taking the others' memory."""
import threading
from collections import OrderedDict
from contextlib import contextmanager

import torch

from .device import available_memory
from .errors import UserError


class ModelShelf:
    """At most `limit` models, shared by every session: each loaded once.

    A session's run borrows a model for as long as it uses it. To load another, the least recently used
    model no run is using makes room; when every place holds a model in use, the request is refused with
    a message for the page rather than loading one more."""

    def __init__(self, limit):
        self.limit = limit
        self.lock = threading.Lock()  # guards places; loading happens outside it, so the others go on
        self.places = OrderedDict()  # key -> _Place, least recently used first

    @contextmanager
    def borrow(self, key, load, name):
        """The model `key` stands for, loaded with load() on first use; `name` names it in messages."""
        with self.lock:
            if key not in self.places:
                self._make_room(name)
                self.places[key] = _Place(name)
            place = self.places[key]
            place.users += 1
            self.places.move_to_end(key)
        try:
            with place.loading:  # the first run loads it; a run that asks meanwhile waits for that one
                if place.model is None:
                    place.model = load()
            yield place.model
        finally:
            with self.lock:
                place.users -= 1
                if place.model is None and not place.users:  # its load failed: the place is free again
                    self.places.pop(key, None)

    def _make_room(self, name):
        if len(self.places) < self.limit:
            return
        idle = [key for key, place in self.places.items() if not place.users]
        if not idle:
            held = ", ".join(place.name for place in self.places.values())
            raise UserError(f"the server's {self.limit} places for models are all in use by other sessions ({held}), "
                            f"so it cannot load {name} now: pick one of those, or try again in a moment (the "
                            "server's --max-models allows more)")
        del self.places[idle[0]]


class _Place:
    def __init__(self, name):
        self.name, self.model, self.users, self.loading = name, None, 0, threading.Lock()


def check_fits_in_memory(path):
    """Refuse the checkpoint at `path` when it is larger than the free memory (its file is about its
    weights' size), before a byte of it is read."""
    needed, available = path.stat().st_size, available_memory()
    if available is not None and needed > available:
        raise UserError(f"{path.name} needs about {needed / 2**20:,.0f} MiB of memory and the server has "
                        f"{available / 2**20:,.0f} MiB free: pick a smaller checkpoint, or free memory on the server")


def out_of_memory(error):
    """Whether `error` is an allocation that failed: Python's, a GPU's, or torch's on the CPU (a RuntimeError)."""
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
