"""Hydra config tree of ``codeformer-train`` / ``codeformer-pipeline`` (YAML only; a package so that
Hydra and ``hydra.initialize_config_module("codeformer_lightning.conf")`` find it when installed)."""
