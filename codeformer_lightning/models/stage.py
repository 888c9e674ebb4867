"""What the three stage modules share: checkpoints that rebuild their networks, and one step numbering.

**Checkpoints.** Every checkpoint records, next to Lightning's own entries, the class and
constructor config of each network the module was given (:data:`~codeformer_lightning.checkpoints.
LIGHTNING_KEY`, plain Python types only, so ``torch.load(weights_only=True)`` reads it). So
``VQGANModule.load_from_checkpoint(ckpt)`` works without passing the networks again, and
:func:`~codeformer_lightning.checkpoints.load_pretrained` turns a ``.ckpt`` into the trained network.

**Numbering.** Every number of a run counts the optimiser (generator) steps completed: the
metrics logged at step 100 are those of the 100th step, or of the validation run after it; the
images of step 100 and ``step_00000100.ckpt`` hold the weights after 100 steps. Lightning logs at
``steps - 1`` by default; the modules bring :class:`~codeformer_lightning.training.numbering.StepNumbering`
(``configure_callbacks``), which logs the ``step`` key that Lightning uses instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import nn

from ..checkpoints import LIGHTNING_KEY, build_network, describe_network, network_spec, read_lightning_record
from ..losses import VQGANLoss
from ..training.numbering import StepNumbering
from .latent_codes import CodeTargetEncoder

#: the classes a checkpoint may rebuild besides the networks of :mod:`codeformer_lightning.checkpoints`
_EXTRA_CLASSES: dict[str, type[nn.Module]] = {"VQGANLoss": VQGANLoss}


class StageModule(pl.LightningModule):
    """Base of the stage modules: see the module docstring.

    Subclasses set :attr:`network_args`, override :meth:`file_free_kwargs` and hold their
    non-finite step guard in ``self.nonfinite``; the checkpoint hooks here save and restore both.
    """

    #: constructor arguments that take modules (with a constructor ``config``), recorded in checkpoints;
    #: each is also the attribute that holds the module
    network_args: ClassVar[tuple[str, ...]] = ("net",)
    #: the state-dict prefix of the network that ``export()`` writes (the EMA copy)
    export_prefix: ClassVar[str] = "ema.module."

    @classmethod
    def file_free_kwargs(cls, networks: dict[str, dict | None]) -> dict[str, Any]:
        """Constructor arguments that stop the constructor from reading weight files, for a rebuild
        whose weights all come from the checkpoint (``networks``: the recorded network specs)."""
        return {}

    # ------------------------------------------------------------------------- checkpoint hooks
    def save_networks(self, checkpoint: dict) -> None:
        """Record the networks' classes and constructor configs in ``checkpoint`` (``on_save_checkpoint``)."""
        targets = getattr(self, "targets", None)
        # the frozen stage I encoder of stages II/III: built from a weight file, rebuilt from its config
        target_spec = None if targets is None else network_spec("VQAutoEncoder", targets.autoencoder_config)
        checkpoint[LIGHTNING_KEY] = {
            "module": type(self).__name__,
            "export": self.export_prefix,
            "networks": {name: describe_network(getattr(self, name, None)) for name in self.network_args},
            "targets": target_spec,
            # the task the exported network is for (CodeFormer stages; load_pretrained reads it)
            "variant": self.hparams.get("variant"),
        }

    def restore_networks(self, checkpoint: dict) -> None:
        """Build the frozen target encoder a rebuilt module lacks (``on_load_checkpoint``, before the
        state dict is loaded into it): it came from a weight file at construction."""
        spec = (checkpoint.get(LIGHTNING_KEY) or {}).get("targets")
        if spec is not None and getattr(self, "targets", None) is None:
            self.targets = CodeTargetEncoder(build_network(spec, "the checkpoint's target encoder"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite.state_dict()
        self.save_networks(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite.load_state_dict(checkpoint.get("nonfinite_steps", {}))
        self.restore_networks(checkpoint)

    # ------------------------------------------------------------------------- numbering
    def configure_callbacks(self) -> list[pl.Callback]:
        return [StepNumbering()]

    # ------------------------------------------------------------------------- loading
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ):
        """Rebuild the module from one of its checkpoints, networks included (Lightning's
        ``load_from_checkpoint``; ``kwargs`` override the saved hyperparameters and networks).

        The networks are built from the configs the checkpoint records and filled from its state
        dict, and the weight files the module read at construction (``autoencoder=``,
        ``init_from=``, ...) are not read again: their weights are in the state dict. The returned
        module's ``hparams`` still name them. Raises
        :class:`~codeformer_lightning.checkpoints.CheckpointError` for a checkpoint without the
        record (another module's, or written before it existed): pass the networks then.
        """
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        record = read_lightning_record(checkpoint, str(checkpoint_path), expected=cls.__name__)
        networks = record["networks"]
        hyper = dict(checkpoint.get("hyper_parameters") or {})
        del checkpoint  # the state dict is read again by Lightning
        for name in cls.network_args:
            if name not in kwargs and networks.get(name) is not None:
                kwargs[name] = build_network(networks[name], f"{checkpoint_path} ({name})", _EXTRA_CLASSES)
        skipped = {k: v for k, v in cls.file_free_kwargs(networks).items() if k not in kwargs}
        module = super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            **kwargs,
            **skipped,
        )
        for key in skipped:  # the hyperparameters describe the run, including the files it started from
            if key in hyper:
                module.hparams[key] = hyper[key]
        return module
