"""What the machine offers, decided once: which BLAS MLX's CPU backend uses (blas.py: a system
OpenBLAS loaded before MLX on Linux) and where compiling a forward pays (compilation.py)."""
