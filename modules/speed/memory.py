"""CPU training: make glibc keep freed memory for reuse instead of handing it back to the system.

glibc serves every allocation over 32 MB with its own mmap and unmaps it when freed. A CPU training step
of GPT-2 allocates gigabytes in such blocks (the logits of a batch alone are 411 MB at 8 x 256 tokens), so
every step the kernel hands out and zeroes fresh pages again: half a million page faults, a fifth of the
step's time on a 2-core AMD EPYC virtual machine (W2 in benchmarks/: 259 against 229 tokens/s).
PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or tcmalloc; this needs no library.
The cost: the process keeps its peak memory instead of returning it between steps, and the heap's
fragments add to that peak (0.4 to 0.9 GB for GPT-2 124M at 8 x 256 tokens).

The setting is process-wide (it is the C library's), so only the training loop applies it, on the CPU.
"""
import ctypes
import sys


def keep_freed_memory():
    """Serve large blocks from the heap, which is never trimmed, so each step reuses the last one's pages
    (Linux with glibc; elsewhere nothing happens). Returns whether the setting took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # a Linux without glibc, e.g. musl
        return False
    trim_threshold, mmap_max = -1, -4  # the M_* parameter numbers of <malloc.h>
    # As `man mallopt` says: no allocation served by mmap, and trimming the heap disabled completely.
    return libc.mallopt(mmap_max, 0) == 1 and libc.mallopt(trim_threshold, -1) == 1
