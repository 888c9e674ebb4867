"""Hand-computed behaviour of the building blocks: catches misplaced norms, activations, padding."""

import torch
import torch.nn.functional as F

from codeformer_lightning.nn import (
    AttnBlock,
    Downsample,
    FusionBlock,
    ResBlock,
    Upsample,
    adaptive_instance_norm,
)
from codeformer_lightning.nn.transformer import TransformerLayer


def test_resblock_matches_hand_computation():
    block = ResBlock(8, 16, norm_groups=4)
    x = torch.randn(2, 8, 5, 5)
    gn = F.group_norm
    h = F.conv2d(F.silu(gn(x, 4, block.norm1.weight, block.norm1.bias, 1e-6)), block.conv1.weight, block.conv1.bias, padding=1)
    h = F.conv2d(F.silu(gn(h, 4, block.norm2.weight, block.norm2.bias, 1e-6)), block.conv2.weight, block.conv2.bias, padding=1)
    expected = F.conv2d(x, block.conv_out.weight, block.conv_out.bias) + h
    torch.testing.assert_close(block(x), expected)


def test_resblock_is_identity_when_its_last_conv_is_zero():
    block = ResBlock(8, 8, norm_groups=4)
    torch.nn.init.zeros_(block.conv2.weight)
    torch.nn.init.zeros_(block.conv2.bias)
    x = torch.randn(1, 8, 4, 4)
    assert block.conv_out is None
    torch.testing.assert_close(block(x), x)


def test_attention_is_over_positions_with_channel_scaling():
    block = AttnBlock(8, norm_groups=4)
    x = torch.randn(2, 8, 3, 4)
    z = F.group_norm(x, 4, block.norm.weight, block.norm.bias, 1e-6)
    q, k, v = (conv(z).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, N)
    attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 8**-0.5, dim=-1)  # (B, N, N)
    out = torch.einsum("bij,bcj->bci", attn, v).reshape(2, 8, 3, 4)
    torch.testing.assert_close(block(x), x + block.proj_out(out), atol=1e-5, rtol=1e-5)


def test_attention_of_a_single_position_passes_the_value_through():
    block = AttnBlock(8, norm_groups=4)
    x = torch.randn(1, 8, 1, 1)
    z = F.group_norm(x, 4, block.norm.weight, block.norm.bias, 1e-6)
    torch.testing.assert_close(block(x), x + block.proj_out(block.v(z)), atol=1e-6, rtol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each window
        down.conv.bias.zero_()
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    torch.testing.assert_close(down(x), x[:, :, ::2, ::2])
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap: falls on the zero padding at the border
    y = down(x)
    assert y[0, 0, -1, -1] == 0 and y[0, 0, 0, 0] == x[0, 0, 2, 2]


def test_upsample_is_nearest_then_conv():
    up = Upsample(1)
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.weight[0, 0, 1, 1] = 1.0
        up.conv.bias.zero_()
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(up(x), expected)


def test_adain_transfers_channel_statistics():
    content = torch.randn(2, 4, 6, 6) * 3 + 1
    style = torch.randn(2, 4, 5, 5) * 0.5 - 2
    out = adaptive_instance_norm(content, style)
    torch.testing.assert_close(out.mean((2, 3)), style.mean((2, 3)), atol=1e-5, rtol=1e-4)
    # published: std = sqrt(unbiased var + 1e-5)
    s_std = (style.flatten(2).var(2) + 1e-5).sqrt()
    c_std = (content.flatten(2).var(2) + 1e-5).sqrt()
    torch.testing.assert_close(out.flatten(2).std(2), s_std * content.flatten(2).std(2) / c_std, atol=1e-5, rtol=1e-4)


def test_fusion_block_is_identity_at_w0_and_affine_in_w():
    block = FusionBlock(8, norm_groups=4)
    enc, dec = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(enc, dec, 0.0), dec)
    d1 = block(enc, dec, 1.0) - dec
    torch.testing.assert_close(block(enc, dec, 0.5) - dec, 0.5 * d1, atol=1e-6, rtol=1e-5)
    # encoder features come first in the concatenation
    swapped = block.encode_enc(torch.cat([dec, enc], 1))
    assert not torch.allclose(block.encode_enc(torch.cat([enc, dec], 1)), swapped)
    h = block.encode_enc(torch.cat([enc, dec], 1))
    torch.testing.assert_close(d1, dec * block.scale(h) + block.shift(h))


def test_transformer_layer_matches_torch_multihead_attention_with_pos_on_qk_only():
    torch.manual_seed(1)
    layer = TransformerLayer(16, 4, 32).eval()
    mha = torch.nn.MultiheadAttention(16, 4)
    mha.in_proj_weight.data.copy_(layer.self_attn.in_proj_weight)
    mha.in_proj_bias.data.copy_(torch.randn(48))
    layer.self_attn.in_proj_bias.data.copy_(mha.in_proj_bias)
    mha.out_proj.load_state_dict(layer.self_attn.out_proj.state_dict())
    x, pos = torch.randn(3, 10, 16), torch.randn(10, 16)
    h = layer.norm1(x).transpose(0, 1)  # (L, B, D)
    p = pos[:, None]
    attn = mha(h + p, h + p, h)[0].transpose(0, 1)
    y = x + attn
    expected = y + layer.linear2(F.gelu(layer.linear1(layer.norm2(y))))
    torch.testing.assert_close(layer(x, pos), expected, atol=1e-5, rtol=1e-5)
