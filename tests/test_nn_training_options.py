"""Training-speed options of the networks and optimisers: results must not change.

Activation checkpointing trades memory for a second forward of each block; the gradients must be
those of the plain backward pass. Fused Adam (one kernel over all parameters) must take the step
the plain per-parameter Adam takes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from codeformer_lightning.nn import CodeFormer, VQAutoEncoder


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _stage3_loss(model: CodeFormer, x: torch.Tensor) -> torch.Tensor:
    out = model.restore(x, w=torch.tensor(1.0), adain=False)
    return out.image.square().mean() + out.logits.logsumexp(-1).mean() + out.lq_feat.abs().mean()


def test_activation_checkpointing_gives_the_same_gradients(tiny_cf_config):
    torch.manual_seed(0)
    plain = CodeFormer(**tiny_cf_config).train()
    with torch.no_grad():
        for p in plain.parameters():  # non-trivial fusion (zero-initialised parts would pass trivially)
            p.add_(0.05 * torch.randn_like(p))
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint_activations = True
    assert ckpt.encoder.checkpoint_activations and ckpt.generator.checkpoint_activations
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss_plain, loss_ckpt = _stage3_loss(plain, x), _stage3_loss(ckpt, x)
    loss_plain.backward()
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=0, rtol=0)
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys()
    # the encoder (code losses), the fusion blocks and the generator's input side all get gradients
    assert any(k.startswith("encoder.") for k in g_plain) and any(k.startswith("fusion.") for k in g_plain)
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_ckpt[name], grad, atol=1e-7, rtol=1e-5, msg=name)


def test_activation_checkpointing_recomputes_and_is_off_outside_training(tiny_ae_config):
    ae = VQAutoEncoder(**tiny_ae_config, checkpoint_activations=True)
    calls = []
    ae.encoder.levels[0].res[0].register_forward_pre_hook(lambda *_: calls.append(1))
    recon, q = ae(torch.rand(1, 3, 32, 32) * 2 - 1)
    (recon.mean() + q.loss).backward()
    assert len(calls) == 2  # the forward, and again in the backward pass
    calls.clear()
    with torch.no_grad():
        ae(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert len(calls) == 1
    assert "checkpoint_activations" not in ae.config  # a training option, not part of the architecture


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_fused_and_foreach_adam_take_the_plain_step(kind):
    torch.manual_seed(0)
    params = [torch.randn(shape) for shape in [(64, 32, 3, 3), (64,), (1024, 512), (7,)]]
    plain = [p.clone().requires_grad_() for p in params]
    fast = [p.clone().requires_grad_() for p in params]
    settings = dict(lr=5e-5, betas=(0.9, 0.99), weight_decay=0.0)  # the published stage II/III Adam
    opt_plain = torch.optim.Adam(plain, foreach=False, **settings)
    opt_fast = torch.optim.Adam(fast, **settings, **{kind: True})
    for step in range(5):
        grads = [torch.randn_like(p) * (step + 1) for p in params]
        for ps, opt in ((plain, opt_plain), (fast, opt_fast)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6)
    for a, b in zip(plain, params):  # the parameters did move
        assert (a.detach() - b).abs().max() > 1e-5
