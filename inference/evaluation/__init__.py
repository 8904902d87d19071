"""Offline: segmentation and classification metrics, and evaluation of a package on phantoms.

Never imported by the runtime packages.
"""
