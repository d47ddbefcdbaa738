"""Public fastres ops (filled in as the kernels land)."""
