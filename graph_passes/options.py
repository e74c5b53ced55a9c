"""Options of the attention substitution: which passes run and which attn backend they target.

Given as a :class:`SubstitutionOptions`, a dict of its fields, or, through
``torch.compile(model, backend="attn_ops", options={...})``, as keys prefixed ``attn_ops.``
(``{"attn_ops.handwritten": False, "attn_ops.attn_backend": "triton"}``) mixed with Inductor
options, which go to Inductor unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PREFIX = "attn_ops."


@dataclass(frozen=True)
class SubstitutionOptions:
    """What the passes substitute.

    Attributes:
        sdpa: replace ``F.scaled_dot_product_attention`` / ``aten.scaled_dot_product_attention``.
        handwritten: replace hand-written ``softmax(q @ k^T * scale + mask) @ v``.
        tensor_masks: accept masks given as tensors when they are provably causal (or empty);
            False substitutes only calls without a mask tensor.
        fold_gqa: pass K/V with their Hkv heads when they were expanded by repeat_kv /
            repeat_interleave (saves the copy); False keeps the expanded tensors.
        checked_masks: over a static cache, accept a bool mask read from a square bool buffer
            at the positions (gpt-fast's ``causal_mask[None, None, input_pos]``), whose data no
            compile-time proof can see, by checking on the device at every call that the mask
            is "key j iff j <= pos" (an async assert: no host sync; a mismatch raises instead
            of computing other attention). False leaves such calls alone.
        attn_backend: the attn backend the substituted calls run on ("reference", "triton",
            "flash", "npu"), or None / "auto" to follow ``attn_ops.use_backend`` /
            ``ATTN_OPS_BACKEND`` / automatic choice at run time. Substitution decisions (head
            dim, dtype) ask this backend's ``supports()``.
        only_if_faster: under automatic backend choice, leave alone a call that only the
            reference backend would run (it is slower than the attention it replaces). None
            means True for ``torch.compile`` (it runs here) and False for
            ``substitute_attention`` (an exported program runs elsewhere, where the op picks
            its backend).
        inline_triton: ``torch.compile`` only: where the backend in force when compiling is
            Triton, Inductor launches our Triton kernels from its generated code
            (:mod:`graph_passes.lowering.inline_triton`), and a change of backend choice
            recompiles; False keeps the attn ops as extern calls that choose at run time.
    """
    sdpa: bool = True
    handwritten: bool = True
    tensor_masks: bool = True
    fold_gqa: bool = True
    checked_masks: bool = True
    attn_backend: str | None = None
    only_if_faster: bool | None = None
    inline_triton: bool = True

    def __post_init__(self):
        if self.attn_backend not in (None, "auto"):
            from attn_ops.registry import BACKENDS
            if self.attn_backend not in BACKENDS:
                raise ValueError(f"attn_backend: unknown backend {self.attn_backend!r}; expected "
                                 f"None, 'auto' or one of {sorted(BACKENDS)}")

    @property
    def backend_choice(self) -> str | None:
        """The explicit backend name, or None for "follow the run-time context"."""
        return None if self.attn_backend in (None, "auto") else self.attn_backend

    def key(self) -> str:
        """A stable text form, part of every pass's ``uuid()``."""
        return ";".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    @classmethod
    def coerce(cls, value) -> SubstitutionOptions:
        """Accept None, a SubstitutionOptions, or a dict of its fields (prefix optional)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            ours, rest = split_options(value, require_prefix=False)
            if rest:
                raise ValueError(f"options: unknown substitution option(s) {sorted(rest)}; "
                                 f"expected {sorted(f.name for f in dataclasses.fields(cls))}")
            return ours
        raise ValueError(f"options: expected None, a dict or SubstitutionOptions, got "
                         f"{type(value).__name__}")


def split_options(options: dict | None, require_prefix: bool = True
                  ) -> tuple[SubstitutionOptions, dict]:
    """Split ``options`` into our :class:`SubstitutionOptions` and the rest (Inductor's).

    With ``require_prefix`` only keys starting with ``attn_ops.`` are ours.
    """
    names = {f.name for f in dataclasses.fields(SubstitutionOptions)}
    ours, rest = {}, {}
    for key, value in (options or {}).items():
        bare = key[len(PREFIX):] if key.startswith(PREFIX) else None
        if bare is None and not require_prefix and key in names:
            bare = key
        if bare is None:
            rest[key] = value
        elif bare in names:
            ours[bare] = value
        else:
            raise ValueError(f"options: unknown option {key!r}; the attn_ops options are "
                             f"{sorted(PREFIX + n for n in names)}")
    return SubstitutionOptions(**ours), rest
