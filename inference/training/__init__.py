"""Offline: training MTSA-Net on a department's data or on phantoms (`dicom-node train`).

Never imported by the runtime packages (`imaging`, `model`, `outputs`, `pipeline`).
"""
