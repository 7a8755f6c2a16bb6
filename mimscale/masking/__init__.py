"""Maskers: modules that turn a batch into a ``MaskPlan`` (base.py). Which masker a run uses is
chosen by the method registry (mimscale/methods/), not here."""
