"""Bundles shipped with rissole-edge (data only; see README.md in this folder)."""
