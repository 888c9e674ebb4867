"""FaceDataModule: configuration, splits, fixed validation, errors, and a 2-process CPU DDP run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_folder
from omegaconf import OmegaConf

from codeformer_lightning.data import FaceDataModule

ROOT = Path(__file__).resolve().parents[2]


def _dm(folder, **kw) -> FaceDataModule:
    args = dict(train_dir=str(folder), image_size=32, batch_size=4, num_workers=0, val_split=2, seed=0)
    args.update(kw)
    return FaceDataModule(**args)


def test_config_file_instantiates_the_data_module(face_folder):
    from hydra.utils import instantiate

    folder, _ = face_folder
    cfg = OmegaConf.load(ROOT / "conf/data/ffhq.yaml")
    root = OmegaConf.create({"seed": 3, "paths": {"data_dir": "unused"}, "data": cfg})
    root.data.train_dir = str(folder)
    root.data.image_size = 32
    root.data.val_split = 2
    dm = instantiate(root.data)
    assert isinstance(dm, FaceDataModule) and dm.hparams.seed == 3
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 2


def test_val_split_is_held_out_fixed_and_flip_free(face_folder):
    folder, names = face_folder
    dm = _dm(folder)
    dm.setup("fit")
    train = {dm.train_set.source.names[i] for i in dm.train_set.indices}
    val = {dm.val_set.source.names[i] for i in dm.val_set.indices}
    assert not train & val and train | val == set(names) and len(val) == 2
    first = next(iter(dm.val_dataloader()))
    dm.train_set.set_epoch(3)
    other = _dm(folder)
    other.setup("validate")
    second = next(iter(other.val_dataloader()))
    assert first["name"] == second["name"] and torch.equal(first["lq"], second["lq"])
    assert other.train_set is None  # validate only builds validation
    train_loader = dm.train_dataloader()
    assert train_loader.batch_size == 4 and not train_loader.persistent_workers


def test_val_dir_and_quickstart_usage(face_folder, tmp_path):
    folder, _ = face_folder
    write_folder(tmp_path / "val", 3, 32, prefix="v")
    dm = _dm(folder, val_dir=str(tmp_path / "val"), val_split=0, degradation="stage3_small")
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(len(b["name"]) for b in batches) == 3
    assert batches[0]["lq"].shape == batches[0]["gt"].shape == (3, 3, 32, 32)


def test_paired_and_codes_reach_batches(face_folder, tmp_path):
    folder, names = face_folder
    codes = {"orig": {n: torch.arange(4) for n in names}, "hflip": {n: torch.arange(4) + 10 for n in names}}
    torch.save(codes, tmp_path / "codes.pth")
    dm = _dm(
        folder, paired_small_large=True, degradation="stage3_small", latent_codes=str(tmp_path / "codes.pth")
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["codes"].shape == (4, 4) and batch["codes"].dtype == torch.long
    assert batch["lq_large"].shape == batch["lq"].shape


def test_clear_errors(tmp_path, face_folder):
    folder, _ = face_folder
    with pytest.raises(ValueError, match="valid presets: none, stage2, stage3_small, stage3_large"):
        _dm(folder, degradation="heavy")
    with pytest.raises(ValueError, match="valid tasks: restoration, inpainting, grayscale"):
        _dm(folder, task="superres")
    with pytest.raises(ValueError, match="exactly one of train_dir"):
        FaceDataModule(train_dir=None, train_lmdb=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _dm(tmp_path / "missing").setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        _dm(tmp_path / "empty").setup("fit")
    with pytest.raises(ValueError, match="leaves no training faces"):
        _dm(folder, val_split=8).setup("fit")
    with pytest.raises(FileNotFoundError, match="latent-code file"):
        _dm(folder, latent_codes=str(tmp_path / "none.pth")).setup("fit")


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    import pytorch_lightning as pl
    from codeformer_lightning.data import FaceDataModule

    class Recorder(pl.LightningModule):
        def __init__(self, out):
            super().__init__()
            self.out = out
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = {}
        def training_step(self, batch, batch_idx):
            for name, lq in zip(batch["name"], batch["lq"]):
                self.seen[name] = float(lq.double().sum())
            return (self.weight * batch["gt"].mean()) ** 2
        def on_train_epoch_end(self):
            path = Path(self.out) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
            path.write_text(json.dumps(self.seen))
            self.seen = {}
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if __name__ == "__main__":
        folder, out = sys.argv[1], sys.argv[2]
        dm = FaceDataModule(train_dir=folder, image_size=32, batch_size=2, num_workers=0, val_split=0,
                            seed=5, degradation="stage2", pin_memory=False, persistent_workers=False)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0)
        trainer.fit(Recorder(out), datamodule=dm)
    """
)


def test_ddp_two_cpu_processes_split_the_data_without_duplicates(tmp_path):
    names = write_folder(tmp_path / "faces", 16, 32)
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "faces"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for epoch in (0, 1):
        seen = [json.loads((tmp_path / "out" / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert len(seen[0]) == len(seen[1]) == 8
        assert not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) == set(names)
    # the epoch reached the dataset: the same face is degraded differently in epoch 1
    by_epoch = [
        {
            **json.loads((tmp_path / "out" / f"rank0_epoch{e}.json").read_text()),
            **json.loads((tmp_path / "out" / f"rank1_epoch{e}.json").read_text()),
        }
        for e in (0, 1)
    ]
    changed = sum(by_epoch[0][n] != by_epoch[1][n] for n in names)
    assert changed >= 14


def test_gpu_degradation_hook_degrades_training_batches_only(face_folder):
    from types import SimpleNamespace

    folder, _ = face_folder
    dm = _dm(folder, gpu_degradation=True, paired_small_large=True, degradation="stage3_small")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["lq"], batch["gt"])  # workers leave degradation to the device
    dm.trainer = SimpleNamespace(training=True, global_rank=0)
    out = dm.on_after_batch_transfer(dict(batch), 0)
    assert not torch.equal(out["lq"], out["gt"]) and not torch.equal(out["lq"], out["lq_large"])
    val = next(iter(dm.val_dataloader()))
    assert not torch.equal(val["lq"], val["gt"])  # validation keeps the numpy degradations
    with pytest.raises(ValueError, match="restoration. only"):
        _dm(folder, gpu_degradation=True, task="grayscale")
