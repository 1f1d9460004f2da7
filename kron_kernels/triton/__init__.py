"""Triton kernels and their launchers, one file per op family.

Nothing here is imported by ``import kron_kernels``: the ops import these modules on the
first call that runs on the Triton backend (so ``TRITON_INTERPRET`` is honoured when set
before that call, and importing the package never imports Triton).
"""
