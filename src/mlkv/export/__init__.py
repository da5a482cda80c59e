"""Portable checkpoints: an MLKV model exported as a folder that loads with transformers alone.

``bundle`` generates the modeling files from mlkv's own model modules, ``card`` writes the model card from what a
folder records, ``folder`` writes the exported folder (``export_checkpoint``), ``command`` is ``mlkv export``.
"""
