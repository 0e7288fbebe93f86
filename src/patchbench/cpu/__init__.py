"""Everything patchbench does only for speed on a CPU, in one package.

- `build`: the C++ operators (csrc/) built and loaded with torch's extension machinery.
- `ops`: the operators' Python side: shapes for FakeTensor, and whether they can be used here.
- `layers`: the layers that run them (depthwise conv weight gradient, GELU -> BatchNorm fused with an
  optional gained residual) and `use_fast_kernels(model)`, which swaps them in.
- `threads`: `ThreadTuner`, the adaptive thread count.
- `memory`: `keep_freed_memory`, the one malloc policy.

Nothing here changes what is computed beyond floating-point summation order; each measure can be turned off (see
docs/USAGE.md) and docs/PERFORMANCE.md gives what each one pays, with the command that measures it.
"""
