"""The Gluon Hopper prefill's guard (hopper_prefill_launch.prefill_guarded): its second launch,
the isolating FA2-style kernel (prefill_kernel.py) in its ``FIXUP`` mode, which reads the flags
the Gluon kernel wrote and rewrites only the half tiles holding a non-finite output row (a leak
of ``0 * NaN``, see hopper_prefill_kernel.py), their lse with them.

Public surface: :func:`fixup` (the launch), :func:`fixup_launch_args` (its plan, which the
bound entry prepares once per call signature) and :func:`extra_pointers` (the optional
pointers both guard launches take).
"""

from __future__ import annotations


def fixup(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, scale: float, causal: bool,
          out, flags, rows: int = 64, config=None, block_table=None, sinks=None,
          lse=None) -> None:
    """Rewrite, with the isolating FA2-style kernel (prefill_kernel.py, ``FIXUP`` mode), only
    the half tiles holding a row that ``flags`` names; write nothing else. ``flags`` int32
    ``[tiles, B + 1, H, F]`` (contiguous; see hopper_prefill_launch.flags_shape: ``2 * rows``-row
    tiles counted from a sequence's last, a flag per ``2 * rows / F`` rows, F even); ``out``
    contiguous ``[Tq, H, D]`` holds the flagging kernel's result (and ``lse``, float32
    ``[Tq, H]``, its lse: the rewritten rows' are rewritten too; ``sinks`` as the flagging
    launch's). No window. A fixed grid of about two programs per SM reads the flags (one
    vector load each); with none set the launch writes nothing."""
    from attn_ops.backends.triton.launch import launch
    from attn_ops.backends.triton.prefill_kernel import _prefill_kernel
    grid, consts, scalars = fixup_launch_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              scale, causal, flags.shape[0], rows, config,
                                              block_table, flags.shape[3] // 2, sinks, lse)
    # q stands in for an absent lse and sinks, and the FP8 scales; dense, cu_seqlens_k for the
    # block table.
    table = block_table if block_table is not None else cu_seqlens_k
    launch(_prefill_kernel, grid, q, k, v, out, cu_seqlens_q, cu_seqlens_k, table,
           *extra_pointers(q, sinks, lse), q, q, flags, *scalars, **consts)


def extra_pointers(q, sinks, lse) -> tuple:
    """The LSE and SINK_LOGITS arguments of both guard launches, the Gluon kernel's and the
    fixup's (q stands in for those not used)."""
    return (q if lse is None else lse, q if sinks is None else sinks)


def fixup_launch_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, scale: float,
                      causal: bool, tiles: int, rows: int = 64, config=None,
                      block_table=None, flags_per_half: int = 1, sinks=None,
                      lse=None) -> tuple:
    """(grid, constexprs and options, the arguments after the 12 pointers) of :func:`fixup`'s
    launch (half tiles of ``rows`` rows, ``flags_per_half`` flags each); the output is
    contiguous."""
    import torch
    import triton

    from attn_ops.backends.triton.common import INTERPRET, device_sm_count, extras
    from attn_ops.backends.triton.prefill_kernel import Config, launch_args
    if config is None:
        # Small key steps: a rare path (a non-finite value reached the rows); its programs that
        # find no flag return after one load, so little shared memory keeps them all resident.
        config = (Config(rows, 16, 4, 1) if INTERPRET
                  else Config(rows, 64 if q.shape[2] <= 128 else 32, 4, 2))
    out_strides = torch.empty(q.shape, device="meta").stride()
    _, consts, scalars = launch_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale,
                                     causal, block_table, -1, 0.0, out_strides,
                                     extras(q, k, sinks, None, None, lse is not None, lse),
                                     config)
    num_heads = q.shape[1]
    programs = triton.cdiv(2 * device_sm_count(q.device), num_heads)  # ~2 per SM
    grid = (max(1, min(tiles * cu_seqlens_q.shape[0], programs)), 1, num_heads)
    return grid, dict(consts, FIXUP=True, FLAGS_PER_HALF=flags_per_half), scalars[:-1] + (tiles,)
