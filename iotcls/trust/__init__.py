"""Trustworthy labels: calibration metrics, exact group Shapley values, the trust decision.

See docs/trust.md. :mod:`.calibration` (ECE, reliability diagram), :mod:`.shapley` (exact
Shapley values over feature groups of the matrix), :mod:`.decision` (the fitted trust state,
the per-label decision, refinement and the trusted device vote).
"""
