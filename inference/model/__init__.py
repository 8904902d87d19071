"""Runtime: MTSA-Net, model packages (manifest + verified weights) and the batched predictor.

`shipped/` holds the committed demo package and its model card. Runs in every worker.
"""
