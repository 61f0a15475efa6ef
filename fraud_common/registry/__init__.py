"""The model registry interface: the only way downstream steps find models.

Backends: ``local`` (a SQLite file, for the embedded run) and ``kubeflow`` (the Kubeflow Model
Registry through the ``model-registry`` client). See ``base.py`` for the contract.
"""
