"""Ctrl-C during training: finish the step, save, and say how to resume."""
import signal

import torch


class StopRequest:
    """The first Ctrl-C asks to stop after the current step, so the step completes and the saved
    checkpoint is consistent; a second Ctrl-C interrupts at once. Use as `with StopRequest() as stop:`
    and read `stop.requested` between steps."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def requested_anywhere(self, parallel, device):
        """Whether Ctrl-C reached any of the processes (parallel.py): then all stop after the same step."""
        return parallel.sum(torch.tensor([float(self.requested)], device=device)).item() > 0
