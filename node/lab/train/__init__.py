"""Training and evaluation that produce model bundles (``neuronode train`` / ``evaluate``)."""
