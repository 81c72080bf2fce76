"""Triton kernels of bagnet_fast, installed as ``bagnet_fast.kernels`` (only ``@triton.jit`` code;
launchers and op registration live in the package). Imported lazily: importing bagnet_fast never
imports triton."""
