"""Distillers beyond SRe2L: each turns real data into a distilled set (ImageFolder + manifest)."""
