"""imc_prune: one-shot pruning by inertial-manifold compression (IMC), built on imc_kernels.

The pruning layer (DESIGN sections 3 and 5): warm-up, Hessian spectrum, Lipschitz estimate,
spectral gap, scores and masks, baselines and sparse-masked training. It consumes
``imc_kernels`` and never the other way round.
"""
