"""The model, pure: factors and loss parameters, sparse observations, the exact objective, the SGD
and WALS solvers (numba kernels beside plain references). No I/O."""
