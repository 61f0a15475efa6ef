"""Monitoring: drift of the prediction log against the training reference, and realized performance once labels arrive."""
