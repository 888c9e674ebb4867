"""The fused CPU inference path (``codeformer_lightning.nn.fused``) against the plain torch path.

The plain path is what training, export and GPUs run (and what the parity tests compare with the
published computation); the fused path must give the same numbers. It runs under
``torch.inference_mode``/``torch.no_grad`` on CPU; ``torch.enable_grad()`` forces the plain path.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from published_files import KEYS_FILE, random_published_state

from codeformer_lightning.checkpoints import published_to_native
from codeformer_lightning.nn import AttnBlock, CodeFormer, Downsample, FusionBlock, ResBlock, Upsample, fused


def _plain(fn, *args):
    with torch.enable_grad():
        return fn(*args)


def _fused(fn, *args):
    with torch.inference_mode():
        return fn(*args)


def _ran_fused_kernels(fn, *args) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _fused(fn, *args)
    return any("_convolution_pointwise" in e.name for e in prof.events())


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # non-trivial values everywhere (zero-initialised parts would hide mistakes)
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parametrize(
    "block,shape",
    [
        (ResBlock(8, 8, norm_groups=4), (2, 8, 7, 9)),
        (ResBlock(8, 16, norm_groups=4), (2, 8, 6, 6)),
        (AttnBlock(16, norm_groups=4), (2, 16, 5, 3)),
        (Downsample(8), (2, 8, 7, 9)),
        (Upsample(8), (2, 8, 5, 7)),  # odd sizes: every phase meets a border
    ],
    ids=["resblock", "resblock_skip_conv", "attention", "downsample", "upsample"],
)
def test_each_block_fused_equals_plain(block, shape):
    block = _perturbed(block)
    x = torch.randn(shape)
    expected = _plain(block, x)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        torch.testing.assert_close(_fused(block, xl), expected, atol=1e-5, rtol=1e-5)
    assert _ran_fused_kernels(block, x)


def test_upsample_phase_kernels_hand_case():
    # nearest x2 then a 3x3 conv whose only tap is the top-left one: output (2i+p, 2j+q) reads the
    # upsampled pixel (2i+p-1, 2j+q-1), i.e. input (floor((2i+p-1)/2), ...), zero outside
    up = Upsample(1).eval()
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.weight[0, 0, 0, 0] = 1.0
        up.conv.bias.fill_(0.5)
    x = torch.arange(1.0, 7.0).reshape(1, 1, 2, 3)
    out = _fused(up, x)[0, 0]
    expected = torch.zeros(4, 6)
    for r in range(4):
        for c in range(6):
            ur, uc = r - 1, c - 1
            expected[r, c] = (x[0, 0, ur // 2, uc // 2] if ur >= 0 and uc >= 0 else 0.0) + 0.5
    torch.testing.assert_close(out, expected)


def test_fusion_block_fused_equals_plain_for_float_and_per_sample_w():
    block = _perturbed(FusionBlock(8, norm_groups=4))
    enc, dec = torch.randn(3, 8, 6, 6), torch.randn(3, 8, 6, 6)
    for w in (0.0, 0.7, torch.tensor([0.0, 0.5, 1.3]).reshape(3, 1, 1, 1)):
        torch.testing.assert_close(_fused(block, enc, dec, w), _plain(block, enc, dec, w), atol=1e-5, rtol=1e-5)
    assert _ran_fused_kernels(block, enc, dec, 0.5)


@pytest.fixture
def tiny_model(tiny_cf_config):
    model = _perturbed(CodeFormer(**tiny_cf_config))
    with torch.no_grad():
        model.position_emb.normal_()
    return model


@pytest.mark.parametrize("adain", [False, True])
def test_tiny_codeformer_fused_equals_plain(tiny_model, adain):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    for w in (0.0, 0.5, torch.tensor([0.0, 0.4, 1.0])):
        expected = _plain(tiny_model.restore, x, w, adain)
        for layout in (torch.contiguous_format, torch.channels_last):
            out = _fused(tiny_model.restore, x.contiguous(memory_format=layout), w, adain)
            assert torch.equal(out.indices, expected.indices)
            torch.testing.assert_close(out.image, expected.image, atol=5e-5, rtol=0)
            torch.testing.assert_close(out.lq_feat, expected.lq_feat, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
            # callers get the usual layout back whatever the network ran in
            assert out.image.is_contiguous() and out.lq_feat.is_contiguous()


def test_packed_weights_follow_weight_updates(tiny_model):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = _fused(tiny_model, x)
    # an EMA-style in-place update (bumps the version counter) ...
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.lerp_(torch.randn_like(p), 0.05)
    after = _fused(tiny_model, x)
    torch.testing.assert_close(after, _plain(tiny_model, x), atol=5e-5, rtol=0)
    assert (after - before).abs().max() > 1e-3
    # ... and loading other weights
    other = _perturbed(CodeFormer(**tiny_model.config))
    tiny_model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_fused(tiny_model, x), _plain(other, x), atol=5e-5, rtol=0)


def test_weights_made_under_inference_mode_are_not_cached(tiny_cf_config):
    # inference tensors have no version counter: an in-place change could not invalidate a cache
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        model = _perturbed(CodeFormer(**tiny_cf_config))
        model(x)
        for p in model.parameters():
            p.mul_(0.9)
        out = model(x)
    reference = _perturbed(CodeFormer(**tiny_cf_config))
    reference.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    torch.testing.assert_close(out, _plain(reference, x), atol=5e-5, rtol=0)


def test_fused_path_only_where_it_applies(tiny_model):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert fused.fast_cpu_inference(x)
        assert not fused.fast_cpu_inference(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused.fast_cpu_inference(x)
        torch.backends.mkldnn.enabled = False
        try:
            assert not fused.fast_cpu_inference(x)
        finally:
            torch.backends.mkldnn.enabled = True
    assert not fused.fast_cpu_inference(x)  # autograd on
    # tracing (TorchScript, the ONNX exporter) records plain torch ops only
    tiny_model.requires_grad_(False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace; the ONNX exporter still uses it
        traced = torch.jit.trace(lambda t: tiny_model(t, w=0.5), (x,), check_trace=False)
    assert "mkldnn" not in str(traced.graph)
    torch.testing.assert_close(traced(x), _plain(tiny_model, x), atol=1e-6, rtol=0)


def test_retain_freed_cpu_memory_sets_glibc_thresholds():
    with pytest.raises(ValueError, match="max_block_bytes"):
        fused.retain_freed_cpu_memory(2**31)
    # a fresh process, so this one's allocator is left alone: freeing a 256 MiB block and taking it
    # again touches fresh pages (the kernel maps and zeroes them) unless the heap keeps the block
    code = (
        "import ctypes, resource, sys\n"
        "from codeformer_lightning.nn import fused\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
        "libc.malloc.argtypes = [ctypes.c_size_t]; libc.free.argtypes = [ctypes.c_void_p]\n"
        "libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]\n"
        "def faults():\n"
        "    n = 256 << 20; p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)\n"
        "    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0\n"
        "before = faults(); applied = fused.retain_freed_cpu_memory(); after = faults()\n"
        "print(applied, before, after)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc: no mallopt")
    before, after = int(out[1]), int(out[2])
    assert before > 60_000  # 256 MiB in 4 KiB pages, mapped afresh
    assert after < 1_000


# ----------------------------------------------------------------------------- published size, 512 px
@pytest.mark.slow
@pytest.mark.skipif(not KEYS_FILE.is_file(), reason=f"{KEYS_FILE} not found (shared/ folder absent)")
def test_published_size_fused_equals_plain():
    model = CodeFormer().eval()
    model.load_state_dict(published_to_native(random_published_state("codeformer"), model))
    x = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(5)) * 2 - 1
    w = torch.tensor([0.5, 1.0])
    model.requires_grad_(False)  # the plain pass then builds no graph
    expected = _plain(model.restore, x, w, True)
    out = _fused(model.restore, x, w, True)
    assert torch.equal(out.indices, expected.indices)
    torch.testing.assert_close(out.image.clamp(-1, 1), expected.image.clamp(-1, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.lq_feat, expected.lq_feat, atol=1e-4, rtol=0)
    assert F.l1_loss(out.image, expected.image) < 1e-6
