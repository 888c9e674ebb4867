"""Behaviour of the quantizer, autoencoder and CodeFormer at tiny sizes."""

import subprocess
import sys

import pytest
import torch

from codeformer_lightning.nn import CodeFormer, PatchDiscriminator, VectorQuantizer, VQAutoEncoder


def test_nn_imports_without_lightning_or_hydra():
    code = (
        "import sys; from codeformer_lightning.nn import CodeFormer, VQAutoEncoder; "
        "import codeformer_lightning; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quantizer_hand_computed_case():
    vq = VectorQuantizer(codebook_size=3, emb_dim=2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    z = torch.tensor([[0.1, 0.9, -0.8, 0.4], [0.2, 1.2, 1.9, 0.3]]).reshape(1, 2, 2, 2).requires_grad_(True)
    out = vq(z)
    # positions (row-major): (0.1,0.2)->0, (0.9,1.2)->1, (-0.8,1.9)->2, (0.4,0.3)->0
    assert out.indices.tolist() == [[0, 1, 2, 0]]
    expected_q = torch.tensor([[0.0, 1.0, -1.0, 0.0], [0.0, 1.0, 2.0, 0.0]]).reshape(1, 2, 2, 2)
    torch.testing.assert_close(out.quantized, expected_q)
    mse = ((expected_q - z) ** 2).mean()
    torch.testing.assert_close(out.loss, 1.25 * mse)
    assert out.counts.tolist() == [2, 1, 1]
    probs = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(out.perplexity, torch.exp(-(probs * probs.log()).sum()))
    assert out.usage.item() == pytest.approx(1.0)
    out.quantized.sum().backward()  # straight-through: d(sum zq)/dz = 1
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    torch.testing.assert_close(vq.lookup(out.indices, (2, 2)), expected_q)


def test_autoencoder_shapes_reconstruction_and_code_round_trip(tiny_ae_config):
    ae = VQAutoEncoder(**tiny_ae_config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, q = ae(x)
    assert recon.shape == x.shape and q.quantized.shape == (2, 32, 4, 4) and q.indices.shape == (2, 16)
    # the straight-through estimate z + (zq - z) equals zq up to rounding
    torch.testing.assert_close(ae.decode_code(q.indices), recon, atol=1e-4, rtol=1e-4)
    (recon.abs().mean() + q.loss).backward()
    assert all(p.grad is not None for p in ae.encoder.parameters())
    assert ae.quantize.embedding.weight.grad is not None


def test_encoder_features_per_resolution(tiny_ae_config):
    ae = VQAutoEncoder(**tiny_ae_config)
    z, feats = ae.encoder(torch.randn(1, 3, 32, 32), feature_resolutions=(32, 16, 8, 4))
    assert {r: tuple(f.shape[1:]) for r, f in feats.items()} == {32: (16, 32, 32), 16: (32, 16, 16), 8: (32, 8, 8), 4: (64, 4, 4)}


def test_bad_sizes_give_clear_errors(tiny_ae_config, tiny_cf_config):
    with pytest.raises(ValueError, match="divisible"):
        VQAutoEncoder(**dict(tiny_ae_config, img_size=36))
    with pytest.raises(ValueError, match="fusion resolutions"):
        CodeFormer(**dict(tiny_cf_config, fusion_resolutions=(64,)))
    with pytest.raises(ValueError, match="GroupNorm"):
        VQAutoEncoder(**dict(tiny_ae_config, norm_groups=32))
    model = CodeFormer(**tiny_cf_config)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=">= 0"):
        model(torch.randn(1, 3, 32, 32), w=-0.5)
    with pytest.warns(UserWarning, match="> 1 extrapolates"):  # allowed, as in the published inference
        model(torch.randn(1, 3, 32, 32), w=1.5)


@pytest.fixture
def tiny_model(tiny_cf_config):
    model = CodeFormer(**tiny_cf_config).eval()
    with torch.no_grad():  # non-trivial fusion and positions (their zero init would hide mistakes)
        model.position_emb.normal_()
        for p in model.fusion.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_w0_is_plain_decoding_of_the_predicted_codes(tiny_model):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tiny_model.restore(x, w=0.0, adain=False)
    torch.testing.assert_close(out.image, tiny_model.decode_code(out.indices))
    torch.testing.assert_close(out.indices, out.logits.argmax(-1))
    logits, lq_feat = tiny_model.predict_codes(x)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(lq_feat, out.lq_feat)


def test_fidelity_weight_changes_output_and_per_sample_w_equals_scalar_calls(tiny_model):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    outs = [tiny_model.restore(x, w=w, adain=True).image for w in (0.0, 0.5, 1.0)]
    assert (outs[0] - outs[2]).abs().max() > 1e-3
    per_sample = tiny_model.restore(x, w=torch.tensor([0.0, 0.5, 1.0]), adain=True).image
    for i in range(3):
        torch.testing.assert_close(per_sample[i], outs[i][i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_model.restore(x, w=torch.tensor(0.5), adain=True).image, outs[1], atol=1e-5, rtol=1e-5)
    clamped = tiny_model(x, w=0.5)
    assert clamped.min() >= -1 and clamped.max() <= 1


def test_fusion_happens_at_the_configured_resolutions(tiny_model):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    seen = []
    for res, block in tiny_model.fusion.items():
        block.register_forward_hook(lambda m, i, o, res=res: seen.append((res, tuple(i[1].shape))))
    tiny_model.restore(x, w=1.0)
    # generator order: deepest first; decoder features of the fused level's channels and size
    assert seen == [("8", (1, 32, 8, 8)), ("16", (1, 32, 16, 16))]


def test_code_only_path_and_freezing_semantics(tiny_cf_config):
    model = CodeFormer(**tiny_cf_config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    logits, lq = model.predict_codes(x)
    assert logits.shape == (2, 16, 64) and lq.shape == (2, 32, 4, 4)
    out = model.restore(x, w=1.0)
    out.image.mean().backward()
    # looked-up codes and encoder skip features enter the generator detached (published stage III)
    assert model.quantize.embedding.weight.grad is None
    assert model.transformer[0].linear1.weight.grad is None
    assert model.fusion["16"].scale[0].weight.grad is not None
    assert model.generator.conv_out.weight.grad is not None


def test_discriminator_published_layout_and_shapes():
    d = PatchDiscriminator()
    names = [n for n, _ in d.state_dict().items()]
    assert names[:3] == ["main.0.weight", "main.0.bias", "main.2.weight"] and "main.14.bias" in names
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 2, 2)
