"""Backends of the attn ops, one module per backend; imported lazily by :mod:`attn_ops.registry`."""
