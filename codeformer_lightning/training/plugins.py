"""Trainer plugins from the config: a mapping of named plugins, so a config group can add one."""

from __future__ import annotations

from typing import Any


def trainer_plugins(**plugins: Any) -> list[Any]:
    """``Trainer(plugins=...)`` from named, already instantiated plugins; null entries are dropped.

    ``conf/trainer/default.yaml`` names ``checkpoint_io`` (atomic checkpoint writes) and
    ``launcher=slurm`` adds ``cluster`` (Lightning's SLURM environment with requeueing), which a
    plain list could not merge.
    """
    return [plugin for plugin in plugins.values() if plugin is not None]
