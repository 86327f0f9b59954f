"""Distillers beyond SRe2L. Trajectory matching: ``buffers`` (expert trajectories), ``mtt`` (MTT and TESLA),
with what they share in ``trajectory``."""
