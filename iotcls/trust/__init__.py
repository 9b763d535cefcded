"""Trustworthy labels: calibration metrics, exact group Shapley values, the trust decision.

See docs/trust.md. :mod:`.calibration` (ECE, reliability diagram), :mod:`.shapley` (exact
Shapley values over feature groups of the matrix), :mod:`.decision` (the fitted trust state,
the per-label decision, refinement and the trusted device vote), :mod:`.layer` (one bundle's
explainer + state, used by :class:`iotcls.predict.Predictor` and training), :mod:`.report`
and :mod:`.evaluation` (figures for ``iotcls evaluate``, the leave-one-type-out test).
"""
