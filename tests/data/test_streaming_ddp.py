"""Shards under real distributed training (issue 17): two processes joined by gloo split every
epoch without overlap and cover every face exactly once; and (slow) ``codeformer-train ...
data=streaming`` trains stage I on two gloo processes, each with two loader workers, then stage II
on the stage I export, every training batch holding the folder dataset's pairs for its indices.

The command test runs ``python -m codeformer_lightning.commands.train`` in a subprocess (Lightning's
DDP launcher re-runs the command for rank 1) with the quickstart faces packed into shards. A
test-only callback, :class:`RecordBatches` (importable by the subprocess: this folder is on its
PYTHONPATH), saves what every training step of every rank received.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("litdata", reason="the [streaming] extra (litdata) is not installed")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from codeformer_lightning import load_pretrained  # noqa: E402
from codeformer_lightning.data import FaceDataset, ImageFolderSource  # noqa: E402
from codeformer_lightning.data.streaming import ShardSource, StreamingFaceDataset, StreamingFaceLoader  # noqa: E402
from codeformer_lightning.nn import CodeFormer, VQAutoEncoder  # noqa: E402

HERE = Path(__file__).resolve().parent
TRAIN = "codeformer_lightning.commands.train"


class RecordBatches(pl.Callback):
    """Every rank saves ``[{"epoch", "index", "name", "gt", "lq"}]`` of its training batches to
    ``out_dir/rank<k>.pt`` at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        keep = ("index", "gt", "lq")
        self.rows.append({"epoch": trainer.current_epoch, "name": list(batch["name"]),
                          **{k: batch[k].detach().cpu().clone() for k in keep}})  # fmt: skip

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.rows, self.out_dir / f"rank{trainer.global_rank}.pt")


def train(tmp_path: Path, *overrides: str, timeout: float = 500) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    common = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "logger=csv", "data=streaming", "data.pin_memory=false"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", TRAIN, *common, *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def only_run(folder: Path) -> Path:
    runs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def assert_folder_pairs(rows: list[dict], folder: Path, degradation: str, seed: int = 0) -> None:
    """Each recorded sample is the folder dataset's sample of its index at its epoch."""
    reference = FaceDataset(ImageFolderSource(folder), 32, degradation, seed=seed)
    for row in rows:
        reference.set_epoch(row["epoch"])
        for j, i in enumerate(row["index"].tolist()):
            expected = reference[i]
            assert row["name"][j] == expected["name"]
            assert torch.equal(row["gt"][j], expected["gt"]) and torch.equal(row["lq"][j], expected["lq"]), (
                row["epoch"],
                i,
            )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    from codeformer_lightning.data.pack_streaming import pack_streaming
    from codeformer_lightning.quickstart import build_face_folder

    root = tmp_path_factory.mktemp("cluster")
    faces = build_face_folder(root / "quickstart_faces", size=32)
    pack_streaming(faces / "train", root / "shards", chunk_mb=0.02, workers=2, progress=False)
    return faces, root / "shards"


def _rank(rank: int, world: int, port: int, shard_dir: str, out: str) -> None:
    """One process of a gloo group: the indices of two epochs as this rank's loader streams them, and
    the rest of them after resuming from rank 0's state at batch 2 of epoch 0 (Lightning saves the
    checkpoint, with its loader state, on rank 0 only and every rank loads it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)

    def loader(position=None):
        faces = FaceDataset(ShardSource(shard_dir), 32, "none")
        return StreamingFaceLoader(StreamingFaceDataset(faces), 10, position=position, num_workers=2)

    try:
        first = loader()
        epochs = [[i for batch in first for i in batch["index"].tolist()] for _ in range(2)]
        state = [loader(position=lambda: (0, 2)).state_dict()]
        torch.distributed.broadcast_object_list(state, src=0)
        resumed = loader()
        resumed.load_state_dict(state[0])
        after = [[i for batch in resumed for i in batch["index"].tolist()] for _ in range(2)]
        result = {"epochs": epochs, "resumed": after, "world": first.dataset.distributed_env.world_size}
        torch.save(result, Path(out) / f"rank{rank}.pt")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_split_every_epoch_without_overlap_cover_every_face_and_resume(shards, tmp_path):
    _, shard_dir = shards
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forked from this process: the ranks start in milliseconds (nothing to import again)
    context = torch.multiprocessing.get_context("fork")
    procs = [context.Process(target=_rank, args=(r, 2, port, str(shard_dir), str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=300)
    finally:
        for p in procs:
            if p.is_alive():  # its partner failed and gloo waits for it
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]  # litdata saw the process group
    for epoch in (0, 1):
        first, second = (r["epochs"][epoch] for r in ranks)
        assert len(first) == len(second) == 50 and not set(first) & set(second)
        assert sorted(first + second) == list(range(100))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]
    for r in ranks:  # resumed after 2 batches of 10: the rest of epoch 0, then epoch 1, as uninterrupted
        assert r["resumed"] == [r["epochs"][0][20:], r["epochs"][1]]


@pytest.mark.slow
def test_stage_one_on_two_gloo_processes_sees_every_face_once_per_epoch_then_stage_two_trains(
    shards, tmp_path
):
    faces, shard_dir = shards
    data = [f"data.train_shards={shard_dir}", f"data.val_dir={faces / 'val'}", "data.batch_size=10",
            f"paths.data_dir={tmp_path}"]  # fmt: skip
    # stage I: 100 faces, 2 ranks x 2 workers, batches of 10: 5 steps per rank and epoch, 2 epochs
    train(tmp_path, "experiment=quickstart_vqgan", *data, "data.num_workers=2", "trainer=ddp_cpu",
          "trainer.max_steps=10", "trainer.val_check_interval=5", "callbacks.model_checkpoint.every_n_train_steps=5",
          "+callbacks.record._target_=test_streaming_ddp.RecordBatches", f"+callbacks.record.out_dir={tmp_path / 'vq'}")  # fmt: skip
    ranks = [torch.load(tmp_path / "vq" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for epoch in (0, 1):
        shares = [
            [i for row in rows if row["epoch"] == epoch for i in row["index"].tolist()] for rows in ranks
        ]
        assert len(shares[0]) == len(shares[1]) == 50
        assert not set(shares[0]) & set(shares[1])  # disjoint
        assert sorted(shares[0] + shares[1]) == list(range(100))  # complete: every face exactly once
    assert [i for row in ranks[0] if row["epoch"] == 0 for i in row["index"].tolist()] != [
        i for row in ranks[0] if row["epoch"] == 1 for i in row["index"].tolist()
    ]  # a new order every epoch
    assert_folder_pairs(ranks[0] + ranks[1], faces / "train", "none")
    vq_run = only_run(tmp_path / "outputs" / "quickstart_vqgan")
    vq_weights = vq_run / "weights" / "quickstart_vqgan.safetensors"
    assert type(load_pretrained(vq_weights)) is VQAutoEncoder

    # stage II from the stage I export, one process, the stage II degradations
    train(tmp_path, "experiment=quickstart_code_predictor", f"model.autoencoder={vq_weights}", *data,
          "data.num_workers=0", "trainer.max_steps=4", "trainer.val_check_interval=4",
          "callbacks.model_checkpoint.every_n_train_steps=4",
          "+callbacks.record._target_=test_streaming_ddp.RecordBatches", f"+callbacks.record.out_dir={tmp_path / 'cp'}")  # fmt: skip
    cp_run = only_run(tmp_path / "outputs" / "quickstart_code_predictor")
    degradation = yaml.safe_load((cp_run / "config.yaml").read_text())["data"]["degradation"]
    assert degradation == "stage2"
    rows = torch.load(tmp_path / "cp" / "rank0.pt", weights_only=False)
    assert len(rows) == 4 and not torch.equal(rows[0]["lq"], rows[0]["gt"])
    assert_folder_pairs(rows, faces / "train", degradation)
    assert type(load_pretrained(cp_run / "weights" / "quickstart_code_predictor.safetensors")) is CodeFormer
    assert torch.load(cp_run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
