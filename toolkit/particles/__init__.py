"""Particle-method building blocks in log space (float64): normalisation, ESS, resampling.

- ``logspace``: ``logsumexp``, ``log_normalize``, ``ess``, ``log_mean_exp`` with the all-``-inf``
  case handled explicitly;
- ``resampling``: multinomial, stratified, systematic and residual resamplers returning ancestor
  indices.
"""
