"""The substitution passes: SDPA calls and hand-written attention -> ``attn.prefill``.

``sdpa_to_prefill`` (Dynamo graph, pre-grad; over a static KV cache it plans with
``sdpa_over_cache``), ``handwritten_attention`` (aten graph, joint-graph
pre-pass; its table of eager forms is ``attention_forms``, matched by ``pattern_matching``),
``export`` (both, on a ``torch.export`` program). ``base`` gives every pass its cache-safe
``uuid()``; ``chain`` runs several passes in one Inductor slot. Passes build on
:mod:`graph_passes.rewrite` (what to emit, and whether it may be emitted) and
:mod:`graph_passes.mask` (is this mask causal).
"""
