"""The causal-mask prover: is a mask tensor built in the graph exactly the causal mask?

``causal_mask`` (evaluate a mask's subgraph, classify it as used), ``domain`` (the exact
abstract values: integer affine positions, half-planes, selections), ``value_rules`` and
``index_rules`` (what each op does to those values). Depends only on
:mod:`graph_passes.fx_nodes`.
"""
