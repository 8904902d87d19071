"""Runtime: a series' files to a volume in exact geometry, the model grid and back, masks to lesions.

Runs in every worker. Imports nothing from `training`, `evaluation` or `synthetic`.
"""
