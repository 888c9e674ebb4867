"""Codebook options beyond the published recipe: cosine codes, k-means init, dead-code restart, EMA."""

from __future__ import annotations

import inspect
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from reference_impl import RefQuantize  # tests/ is on sys.path (tests/conftest.py)

from codeformer_lightning import load_pretrained
from codeformer_lightning.nn import VectorQuantizer, VQAutoEncoder
from codeformer_lightning.nn.quantizer import CodebookTrainer, kmeans


def _clusters(n_per: int, centres: torch.Tensor, spread: float = 0.01, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c + spread * torch.randn(n_per, centres.shape[1], generator=g) for c in centres])


def _as_map(rows: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (1, D, 1, N): a 'latent' whose positions are the rows."""
    return rows.t().reshape(1, rows.shape[1], 1, rows.shape[0])


def test_default_quantizer_matches_published_bit_for_bit():
    vq, ref = VectorQuantizer(64, 8), RefQuantize(64, 8)
    with torch.no_grad():
        vq.embedding.weight.normal_()
        ref.embedding.weight.copy_(vq.embedding.weight)
    z = torch.randn(2, 8, 5, 5)
    out = vq(z)
    zq, loss, idx = ref(z)
    assert torch.equal(out.quantized, zq) and torch.equal(out.loss, loss)
    assert torch.equal(out.indices.flatten(), idx.flatten())


def test_l2_normalized_codes_are_unit_vectors_chosen_by_cosine():
    vq = VectorQuantizer(16, 4, l2_normalize=True)
    with torch.no_grad():
        vq.embedding.weight.normal_().mul_(torch.linspace(0.1, 10, 16)[:, None])  # norms must not matter
    z = torch.randn(3, 4, 2, 2, requires_grad=True)
    out = vq(z)
    flat = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    cos = flat @ F.normalize(vq.embedding.weight.detach(), dim=1).t()
    assert torch.equal(out.indices.flatten(), cos.argmax(dim=1))
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(3, 2, 2))
    torch.testing.assert_close(vq.lookup(out.indices, (2, 2)), out.quantized)
    out.quantized.sum().backward()  # straight-through to z, through the normalisation
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_quantizer_picks_codes_in_fp32_under_autocast():
    vq = VectorQuantizer(512, 16)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    z = torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = vq(z.bfloat16()).indices
    assert torch.equal(idx, vq(z.bfloat16().float()).indices)


def test_kmeans_recovers_separated_clusters():
    centres = torch.eye(4) * 5
    x = _clusters(50, centres)
    found, sizes = kmeans(x, 4, iters=20, generator=torch.Generator().manual_seed(0))
    dist_ = torch.cdist(found, centres)
    assert dist_.min(dim=1).values.max() < 0.05 and sorted(sizes.tolist()) == [50.0] * 4


def test_kmeans_init_sets_codebook_from_encoder_outputs_once_enough_seen():
    vq = VectorQuantizer(8, 4)
    upkeep = CodebookTrainer(8, 4, kmeans_init=True, kmeans_min_samples=64, samples_per_step=32)
    centres = torch.randn(8, 4) * 5
    before = vq.embedding.weight.detach().clone()
    assert not upkeep.before_quantize(vq, _as_map(_clusters(4, centres, seed=1)), step=0)  # 32 rows: too few
    assert torch.equal(vq.embedding.weight, before)
    assert upkeep.before_quantize(vq, _as_map(_clusters(4, centres, seed=2)), step=1)  # 64 rows: init
    assert torch.cdist(vq.embedding.weight.detach(), centres).min(dim=1).values.max() < 0.1
    out = vq(_as_map(_clusters(10, centres, seed=3)))
    assert out.usage.item() == 1.0
    assert not upkeep.before_quantize(vq, _as_map(_clusters(4, centres, seed=4)), step=2)  # only once


def test_dead_codes_restart_from_recent_encoder_outputs_with_grace_period():
    vq = VectorQuantizer(6, 2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0], [1, 0], [0, 1], [50, 50], [60, 60], [70, 70]]))
    upkeep = CodebookTrainer(6, 2, dead_code_steps=3, buffer_size=64, samples_per_step=16)
    data = _as_map(_clusters(4, torch.tensor([[0.0, 0], [1, 0], [0, 1]]), spread=0.05))
    for step in range(3):
        upkeep.before_quantize(vq, data, step)
        upkeep.after_backward(vq, data, vq(data).indices, step)
        assert upkeep.restart_dead_codes(vq, step).numel() == 0  # not dead for 3 steps yet
    old = vq.embedding.weight.detach().clone()
    restarted = upkeep.restart_dead_codes(vq, 3)
    assert sorted(restarted.tolist()) == [3, 4, 5]
    new = vq.embedding.weight.detach()
    assert torch.equal(new[:3], old[:3])
    # each restarted code now sits on one of the recent encoder outputs
    pool = upkeep.code_buffer[: int(upkeep.buffer_seen)]
    assert torch.cdist(new[3:], pool, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() == 0
    assert (upkeep.last_used[3:] == 3).all() and upkeep.restart_dead_codes(vq, 4).numel() == 0


def test_ema_codebook_moves_to_the_mean_of_its_assigned_vectors():
    vq = VectorQuantizer(2, 2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [4.0, 4.0]]))
    upkeep = CodebookTrainer(2, 2, ema_decay=0.8)
    data = _as_map(torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 3.0], [3.0, 5.0]]))
    for step in range(60):
        upkeep.after_backward(vq, data, vq(data).indices, step)
    torch.testing.assert_close(vq.embedding.weight.detach(), torch.tensor([[1.0, 0.5], [3.0, 4.0]]), atol=1e-3, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(100 + rank)  # ranks start from different codebooks
        vq = VectorQuantizer(8, 3)
        upkeep = CodebookTrainer(8, 3, kmeans_init=True, kmeans_min_samples=64, dead_code_steps=2, ema_decay=0.9,
                                 buffer_size=128, samples_per_step=32)
        # rank 0 sees clusters near +x, rank 1 near -x: the k-means must use both ranks' data
        centres = torch.tensor([[5.0, 0, 0], [5, 5, 0], [5, 0, 5], [5, 5, 5]]) * (1 if rank == 0 else -1)
        for step in range(6):
            data = _as_map(_clusters(8, centres, spread=0.1, seed=10 * step + rank))
            upkeep.before_quantize(vq, data, step)
            upkeep.after_backward(vq, data, vq(data).indices, step)
            upkeep.restart_dead_codes(vq, step)
        weights = [torch.empty_like(vq.embedding.weight) for _ in range(world)]
        dist.all_gather(weights, vq.embedding.weight.detach())
        if rank == 0:
            out["weights"] = [w.clone() for w in weights]
            out["signs"] = torch.sign(weights[0][:, 0]).tolist()
    finally:
        dist.destroy_process_group()


def test_codebook_upkeep_keeps_ranks_identical_under_distributed():
    out = mp.Manager().dict()
    mp.spawn(_dist_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    w0, w1 = out["weights"]
    assert torch.equal(w0, w1)
    assert {1.0, -1.0} <= set(out["signs"])  # codes on both ranks' data


def _supports_l2_config() -> bool:
    return "l2_normalize" in inspect.signature(VQAutoEncoder.__init__).parameters


@pytest.mark.skipif(not _supports_l2_config(), reason="VQAutoEncoder has no l2_normalize argument yet (see stage I report)")
def test_l2_option_survives_export_and_load(tmp_path, tiny_ae32_config):
    from codeformer_lightning import save_weights

    ae = VQAutoEncoder(**tiny_ae32_config, l2_normalize=True).eval()
    loaded = load_pretrained(save_weights(ae, tmp_path / "ae.safetensors"))
    assert loaded.quantize.l2_normalize
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x)[0], ae(x)[0])
