"""Numerical parity with the published computation (tests/reference_impl.py), fp32 on CPU.

The reference loads the published key layout directly; ours goes through ``load_pretrained`` and the
key converter, so these tests check networks and converter together. Published inference compares
images clamped to [-1, 1]; we check those within 1e-4 and the code indices for equality.
"""

from __future__ import annotations

import pytest
import torch
from published_files import KEYS_FILE, random_published_state, write_published_file
from reference_impl import RefCodeFormer, RefVQAutoEncoder

from codeformer_lightning import load_pretrained
from codeformer_lightning.checkpoints import published_to_native
from codeformer_lightning.nn import CodeFormer, VQAutoEncoder

needs_keys = pytest.mark.skipif(not KEYS_FILE.is_file(), reason=f"{KEYS_FILE} not found (shared/ folder absent)")
SETTINGS = [(0.0, False), (0.0, True), (0.5, False), (0.5, True), (1.0, False), (1.0, True)]


def _assert_parity(ref_out, ours):
    ref_img, ref_logits, ref_lq = ref_out
    assert torch.equal(ref_logits.argmax(-1), ours.indices)
    torch.testing.assert_close(ours.lq_feat, ref_lq, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.logits, ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.image.clamp(-1, 1), ref_img.clamp(-1, 1), atol=1e-4, rtol=0)


def _tiny_pair(cfg, seed=0):
    torch.manual_seed(seed)
    ref = RefCodeFormer(
        img_size=cfg["img_size"], nf=cfg["nf"], ch_mult=cfg["ch_mult"], res_blocks=cfg["res_blocks"],
        attn_res=cfg["attn_resolutions"], codebook_size=cfg["codebook_size"], emb_dim=cfg["emb_dim"],
        groups=cfg["norm_groups"], dim_embd=cfg["dim_embd"], n_head=cfg["n_head"], n_layers=cfg["n_layers"],
        connect_list=[str(r) for r in cfg["fusion_resolutions"]],
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ref.quantize.embedding.weight.normal_()
    ours = CodeFormer(**cfg).eval()
    ours.load_state_dict(published_to_native(ref.state_dict(), ours))
    return ref, ours


@pytest.mark.parametrize("w,adain", SETTINGS)
def test_tiny_codeformer_matches_reference(tiny_cf_config, w, adain):
    ref, ours = _tiny_pair(tiny_cf_config)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        _assert_parity(ref(x, w=w, adain=adain), ours.restore(x, w=w, adain=adain))


def test_tiny_configs_with_attention_and_fusion_at_every_level(tiny_cf_config):
    # attention at two levels and fusion everywhere: exercises the generator's fusion point rule
    cfg = dict(tiny_cf_config, attn_resolutions=(4, 8), fusion_resolutions=(4, 8, 16, 32), res_blocks=3)
    ref, ours = _tiny_pair(cfg, seed=3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        _assert_parity(ref(x, w=0.8, adain=True), ours.restore(x, w=0.8, adain=True))


def test_tiny_code_only_path_matches_reference(tiny_cf_config):
    ref, ours = _tiny_pair(tiny_cf_config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref_logits, ref_lq = ref(x, code_only=True)
        logits, lq = ours.predict_codes(x)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(lq, ref_lq, atol=1e-5, rtol=0)


def test_tiny_autoencoder_matches_reference(tiny_ae_config):
    c = tiny_ae_config
    ref = RefVQAutoEncoder(c["img_size"], c["nf"], c["ch_mult"], c["res_blocks"], c["attn_resolutions"],
                           c["codebook_size"], c["emb_dim"], c["norm_groups"]).eval()
    ours = VQAutoEncoder(**c).eval()
    ours.load_state_dict(published_to_native(ref.state_dict(), ours))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref_img, ref_loss, ref_idx = ref(x)
        img, q = ours(x)
    assert torch.equal(q.indices.flatten(), ref_idx.flatten())
    # unclamped outputs up to ~4 after ~20 layers: float32 rounding alone reaches ~1e-5 here
    torch.testing.assert_close(img, ref_img, atol=1e-4, rtol=0)
    torch.testing.assert_close(q.loss, ref_loss)


# ----------------------------------------------------------------------------- published sizes, 512 px
@pytest.fixture(scope="module")
def published_pair(tmp_path_factory):
    path = write_published_file(tmp_path_factory.mktemp("parity") / "codeformer.pth", "codeformer")
    ref = RefCodeFormer().eval()
    ref.load_state_dict(random_published_state("codeformer"))
    return ref, load_pretrained(path)


def _published_check(pair, w, adain):
    ref, ours = pair
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.inference_mode():
        _assert_parity(ref(x, w=w, adain=adain), ours.restore(x, w=w, adain=adain))
        torch.testing.assert_close(ours(x, w=w, adain=adain), ref(x, w=w, adain=adain)[0].clamp(-1, 1), atol=1e-4, rtol=0)


@needs_keys
def test_published_restoration_matches_reference_default_inference(published_pair):
    _published_check(published_pair, 0.5, True)


@needs_keys
@pytest.mark.slow
@pytest.mark.parametrize("w,adain", [s for s in SETTINGS if s != (0.5, True)])
def test_published_restoration_matches_reference_all_settings(published_pair, w, adain):
    _published_check(published_pair, w, adain)


@needs_keys
def test_published_autoencoder_matches_reference(tmp_path):
    path = write_published_file(tmp_path / "vqgan_code1024.pth", "vqgan_code1024")
    ref = RefVQAutoEncoder().eval()
    ref.load_state_dict(random_published_state("vqgan_code1024"))
    ours = load_pretrained(path)
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.inference_mode():
        ref_img, _, ref_idx = ref(x)
        img, q = ours(x)
    assert torch.equal(q.indices.flatten(), ref_idx.flatten())
    torch.testing.assert_close(img.clamp(-1, 1), ref_img.clamp(-1, 1), atol=1e-4, rtol=0)


@needs_keys
@pytest.mark.slow
@pytest.mark.parametrize("kind,fusion", [("codeformer_colorization", "32"), ("codeformer_inpainting", "32")])
def test_published_colorization_and_inpainting_match_reference(tmp_path, kind, fusion):
    path = write_published_file(tmp_path / f"{kind}.pth", kind)
    state = random_published_state(kind)
    ref = RefCodeFormer(codebook_size=state["quantize.embedding.weight"].shape[0], connect_list=["32", "64", "128"]).eval()
    ref.load_state_dict(state)
    ours = load_pretrained(path)
    for w, adain in [(0.0, True), (1.0, False)]:
        _published_check((ref, ours), w, adain)
