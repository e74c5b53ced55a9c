"""Rewriting one dense attention call: the ``attn.prefill`` it becomes and whether it may.

``dense_prefill`` (``[B, H, S, D]`` <-> token-major THD views, in-graph ``cu_seqlens``; eager
and FX-emitting forms), ``gqa_folding`` (undo a ``repeat_kv`` / ``repeat_interleave`` head
expansion), ``eligibility`` (the op contract and the chosen backend's ``supports()``, read from
fake values). Imports nothing from :mod:`graph_passes.passes`.
"""
