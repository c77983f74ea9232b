"""Keep freed memory for reuse in a process that decodes (the server, `scripts/translate.py`).

glibc's malloc hands large freed blocks back to the kernel and maps fresh pages for the next ones, and a batch's
decoding steps allocate many (activations of 32 sentences, the encoder's 2 MB products, the int8 kernels' buffers on
their own threads): each page is faulted in again, which costs more than the arithmetic on it. Measured on a 2-core
Zen 4 (avx512-bf16), Transformer-base int8, 32 sentences in one `generate()`: 11,000 page faults with glibc's
defaults, 40 with freed memory kept; in 5 pairs of alternating processes (medians of 5 each) 309-330 ms against
289-296 ms in four, the fifth reversed (medians 321 and 296 ms); one sentence: no difference beyond noise. Memory is
reused, not grown: the peak stays the peak.

This changes the whole process's allocator, so only the programs that own their process call it, not the library.
"""

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap, where freed ones are reused (glibc's own ceiling for its dynamic threshold
# on 64-bit is 32 MB: a Transformer-big batch's largest activations fit under it).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Freed memory at the top of the heap is returned to the kernel only beyond this.
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024


def reuse_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed blocks of up to 32 MB for reuse; False (and nothing done) without glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and done
    logger.debug("malloc keeps freed blocks up to %d bytes for reuse: %s", MMAP_THRESHOLD_BYTES, done)
    return done
