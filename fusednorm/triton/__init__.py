"""The Triton kernel family (the "triton" backend's host code is ``fusednorm/backends/triton_impl.py``).

- ``forward.py`` / ``backward.py``: one forward and one backward kernel; variants are constexpr flags
  (``fusednorm.variant.Variant.triton_forward_flags`` / ``triton_backward_flags``).
- ``helpers.py``: the small @triton.jit pieces both share (Philox dropout mask, row statistics, ...).
- ``telemetry.py``: the forward's optional per-row statistics (STORE_STATS, DESIGN section 7).
- ``heuristics.py``: block size, warps and rows per program, with the reasoning.

Importing this package imports triton: only the triton backend does, when it is first used.
"""
