"""Passes that lower the attn ops to kernels Inductor compiles into its own generated code."""
