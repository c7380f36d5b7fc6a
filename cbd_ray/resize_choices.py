"""The resize choices per axis, in a module of their own so the CLI can list them in
``--help`` without importing torch (:mod:`cbd_ray.resize` re-exports them)."""

LAYER_SUBSET = ("uniform", "importance")
LAYER_EXPAND = ("replicate", "identity")
WIDTH_SUBSET = ("importance", "magnitude", "first")
WIDTH_EXPAND = ("zero", "copy")
