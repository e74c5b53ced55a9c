"""The split-KV counters: how split programs count in so that one of them merges
(:func:`last_to_count_in`, on the device), and the buffers they count in (:func:`semaphores`:
zero between calls, kept per stream, never a memset per call), with the same keeping for the
Hopper prefill's flags (:func:`scratch`) and the split decodes' partials (:func:`partials`).

Used by the split merges (``merge_kernel.merge_last_split``, ``merge_kernel.merge_pieces``,
``softmax.merge_if_last``) and their launchers. Imported only by the kernel modules (it imports
triton).
"""

from __future__ import annotations

import math
import threading

import torch
import triton
import triton.language as tl


# The counter of :func:`last_to_count_in`: arrivals in the low 16 bits, published partials in the
# high 16, so a count (splits, or a pair's key tiles) must stay below this.
COUNT_LIMIT = 1 << 15


@triton.jit
def last_to_count_in(SEMA, idx, mine, total):
    """Count ``mine`` (splits or key tiles of this program) in at counter ``SEMA[idx]``; True in
    the one program that completes ``total``, and only once every other program's partial is
    visible to it. Each program must have stored its partial before the call.

    Two fields, so the last program waits on no memory fence of its own: an atomic that was one
    acq_rel add made the last program, like every other, first wait for its partial's stores to
    reach L2 (sm_90a: ``MEMBAR.ALL.GPU`` before the ``ATOMG``) and only then learn that it
    merges. Now each program first adds ``mine`` to the arrivals (acquire only: no fence before
    it); the one whose arrival completes ``total`` merges, after it has seen the others publish
    (their release add of ``mine << 16``, which the others make after their arrival). The
    program that ends a kernel's critical path is one that merges, so the fence leaves that
    path (its own partial is read back after the CTA's barrier, which orders its threads' stores
    before its loads). It resets the counter with a plain store: the next launch on the stream
    starts after this one ends, or, launched as a programmatic dependent (common.LAUNCH_PDL),
    reads nothing before its first instruction's wait for this one's end.
    """
    tl.debug_barrier()
    seen = tl.atomic_add(SEMA + idx, mine, sem="acquire")
    last = (seen & 0xFFFF) + mine == total
    if last:
        published = (seen >> 16) & 0xFFFF
        while published < total - mine:  # an earlier arrival still storing its partial
            published = (tl.atomic_add(SEMA + idx, 0, sem="acquire") >> 16) & 0xFFFF
    else:
        tl.atomic_add(SEMA + idx, mine << 16, sem="release")
    return last


# Split-KV semaphores (``softmax.merge_if_last``, ``merge_kernel.merge_last_split``): one int32
# counter per (tile or sequence, kv head) of a split launch, zero between calls (the program that
# merges resets its counter; :func:`last_to_count_in` says what the counter holds). Eager calls
# share one buffer per (device, stream): launches on one stream run in order, on two streams
# never share a counter. A call being captured into a CUDA graph takes counters no other call
# will ever use (a slice of a zeroed slab, _Slab): two graphs captured on one stream (as
# torch.compile's graph trees capture them) may be replayed at once on two streams. Buffers are
# grown, never shrunk or freed (~4 KB for B = 128, Hkv = 8; a slab 256 KB): a launch queued on a
# stream, or a captured graph, may still use them (_RETIRED).
_SEMAPHORES: dict = {}
_RETIRED: list = []
_SLABS: dict = {}
_SLAB_SIZE, _SLAB_LOW = 1 << 16, 1 << 13  # counters per slab; eager calls refill below _LOW
_SLAB_LOCK = threading.Lock()
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream",
                      lambda index: torch.cuda.current_stream(index).cuda_stream)
# Whether the current CUDA stream is being captured into a graph (torch's C function: no Python
# frame; False on a build without CUDA).
capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: False)


class _Slab:
    """A zeroed int32 buffer handed out front to back, each range once (to captured calls)."""

    def __init__(self, buf: torch.Tensor):
        self.buf, self.used = buf, 0

    def take(self, count: int) -> torch.Tensor | None:
        with _SLAB_LOCK:
            if self.used + count > self.buf.numel():
                return None
            self.used += count
            return self.buf[self.used - count:self.used]


def _empty_off_thread(size: int, device: torch.device, dtype=torch.int32) -> torch.Tensor:
    """``size`` elements of ``dtype`` on ``device``, allocated on a thread of its own. Off-thread,
    the buffer never lands in a memory pool that the calling thread routes its allocations to:
    torch.compile's CUDA-graph trees route a warm-up's allocations to their pool and reject a
    live tensor there that is no graph output ("not tracked as outputs")."""
    box: list = []
    worker = threading.Thread(target=lambda: box.append(
        torch.empty(size, dtype=dtype, device=device)))
    worker.start()
    worker.join()
    return box[0]


def _zeros_off_thread(size: int, device: torch.device) -> torch.Tensor:
    """:func:`_empty_off_thread` int32, zeroed on the caller's current stream."""
    return _empty_off_thread(size, device).zero_()


def semaphores(count: int, device: torch.device) -> torch.Tensor:
    """``count`` (at least) zeroed int32 counters for a split launch on ``device``'s current
    stream, without a memset per call (a fresh zeroed buffer costs one: 1.8 us on the H200, more
    than the merge launch a fused merge saves).

    Eager: one buffer per (device, stream), kept between calls (the merging program leaves its
    counter zero). Being captured into a CUDA graph: counters of their own, a range of a slab
    that an eager call zeroed before the capture; when no slab has room (no eager call came
    first, or a capture took more than the slab's ~60 K counters), a fresh zeroed buffer, whose
    memset the graph replays. Under a dispatch mode (fake or functional tensors: a
    ``triton_op`` traced by AOTAutograd) a fresh zeroed buffer, never cached: a traced tensor
    in the cache would reach a real launch.
    """
    if torch._C._len_torch_dispatch_stack():
        return torch.zeros(max(count, 1), dtype=torch.int32, device=device)
    # The raw stream handle, as Triton's launch reads it (~0.2 us; torch.cuda.current_stream
    # builds a Stream object: ~2 us on the development CPU).
    index = (device.index if device.index is not None else torch.cuda.current_device()
             ) if device.type == "cuda" else None
    # A tensor's device has its index: build one (~0.3 us) only for a bare "cuda".
    where = device if device.index is not None or index is None else torch.device("cuda", index)
    if index is not None and capturing():
        slab = _SLABS.get(where)
        taken = slab.take(count) if slab is not None else None
        return taken if taken is not None else torch.zeros(count, dtype=torch.int32,
                                                           device=where)
    slab = _SLABS.get(where)
    if index is not None and (slab is None or slab.buf.numel() - slab.used < max(count,
                                                                                _SLAB_LOW)):
        # Zeroed on this stream before any capture that takes from it (torch.cuda.graph
        # synchronizes the device before it starts capturing).
        if slab is not None:
            _RETIRED.append(slab.buf)
        _SLABS[where] = _Slab(_zeros_off_thread(max(_SLAB_SIZE, 8 * count), where))
    return _per_stream(_SEMAPHORES, count, where, index)


def _per_stream(cache: dict, count: int, where: torch.device, index: int | None) -> torch.Tensor:
    """``cache``'s zeroed int32 buffer of at least ``count`` for ``where``'s current stream."""
    key = (where, _raw_stream(index) if index is not None else 0)
    buf = cache.get(key)
    if buf is None or buf.numel() < count:
        if buf is not None:
            _RETIRED.append(buf)
        buf = cache[key] = _zeros_off_thread(max(count, 4096), where)
    return buf


_SCRATCH: dict = {}


def scratch(count: int, device: torch.device) -> torch.Tensor:
    """At least ``count`` int32 on ``device`` (CUDA: with an index) for a launch that writes every
    element before it, or a later launch on the stream, reads one (the Hopper prefill's flags):
    eager calls share one kept buffer per (device, stream), so a call allocates nothing (a
    fresh buffer cost ~2 us of host time per call, the memset it replaced 9 us on the H200
    host). A call being captured into a CUDA graph, or traced, gets a fresh ``torch.empty``:
    graphs replayed at once must not share it, nor may a traced tensor be kept."""
    if device.type != "cuda" or torch._C._len_torch_dispatch_stack() or capturing():
        return torch.empty(max(count, 1), dtype=torch.int32, device=device)
    return _per_stream(_SCRATCH, count, device, device.index)


def scratch_on(count: int, device: torch.device, stream: int) -> torch.Tensor:
    """:func:`scratch` for an eager call that holds ``stream``, the raw handle of the current
    stream of ``device`` (CUDA, with an index), and has checked that nothing is being captured
    or traced: the kept buffer by one dict lookup."""
    buf = _SCRATCH.get((device, stream))
    if buf is None or buf.numel() < count:
        return _per_stream(_SCRATCH, count, device, device.index)
    return buf


# Split partials (:func:`partials`): per (device, stream), one float32 buffer and the views of it
# handed out so far, by shape.
_PARTIALS: dict = {}
_PARTIALS_MIN = 1 << 16  # floats (256 KB): a B 16 decode's partials fit the first buffer
_LSE_ALIGN = 64  # floats: the LSE view starts 256 bytes past the output partials' end


def partials(o_shape: tuple, lse_shape: tuple, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(o_part, lse_part)`` of these shapes on ``device``, for a split launch whose
    programs write each element they, or the merge after them on the stream, read (the split
    decodes' partial outputs and log-sum-exps).

    Eager calls share one kept buffer per (device, stream) and the views of it, kept by
    shape: a call allocates nothing (~1.5 us), where two ``torch.empty`` cost 7-11 us of host
    time per call on the H200 hosts, a third of a small decode's bound call (BENCHMARKS.md,
    twenty-sixth pass). Launches on one stream run in order (a PDL launch waits for the one
    before it at its first instruction, before any load or store), so no two calls read or
    write the buffer at once (the interpreter's launches on the CPU run before they return).
    A call being captured into a CUDA graph, or traced, gets fresh tensors: graphs replayed at
    once must not share them, and no traced tensor may be kept. The buffer grows at least
    twofold and is never freed (a queued launch may still use it: _RETIRED)."""
    index = (device.index if device.index is not None else torch.cuda.current_device()
             ) if device.type == "cuda" else None
    if torch._C._len_torch_dispatch_stack() or index is not None and capturing():
        return (torch.empty(o_shape, dtype=torch.float32, device=device),
                torch.empty(lse_shape, dtype=torch.float32, device=device))
    where = device if device.index is not None or index is None else torch.device("cuda", index)
    key = (where, _raw_stream(index) if index is not None else 0)
    kept = _PARTIALS.get(key)
    if kept is not None:
        views = kept[1].get((o_shape, lse_shape))
        if views is not None:
            return views
    o_size, lse_size = math.prod(o_shape), math.prod(lse_shape)
    lse_at = -(-o_size // _LSE_ALIGN) * _LSE_ALIGN
    if kept is None or kept[0].numel() < lse_at + lse_size:
        grown = max(lse_at + lse_size, _PARTIALS_MIN, 2 * kept[0].numel() if kept else 0)
        if kept is not None:
            _RETIRED.append(kept[0])
        kept = _PARTIALS[key] = (_empty_off_thread(grown, where, torch.float32), {})
    buf = kept[0]
    views = kept[1][(o_shape, lse_shape)] = (buf[:o_size].view(o_shape),
                                              buf[lse_at:lse_at + lse_size].view(lse_shape))
    return views
