"""One stage III training step at 512 px, batch 1, on CPU: ours against a published-style step.

Both steps hold the same random weights and compute the same losses on the same batch (codes given,
as the published stage III reads them from a latent-code file; w = 1; GAN on, as after step 5000):
CE + feature MSE on the code path, L1 + LPIPS (VGG16 with random weights unless ``--vgg`` names the
file; the packaged LPIPS heads) + 0.1 * adaptive weight * hinge GAN on the image, one Adam step of
the generator side (encoder, Transformer, fusion blocks), the EMA update, then one discriminator
step (hinge, real and fake passes), one Adam step of the discriminator.

* ``ours``: the real :class:`~codeformer_lightning.models.cft.CFTModule` ``training_step`` under a
  Lightning ``Trainer`` (manual optimisation, logging, the non-finite guard), with fused Adam
  (``torch.optim.Adam(fused=True)`` for both optimisers);
* ``ours + checkpointing``: the same with ``checkpoint_activations`` on (every other step);
* ``baseline``: the published ``CodeFormerJointModel.optimize_parameters`` written out below over
  ``tests/reference_impl.py`` (flat blocks, bmm attention, one-hot code lookup, per-parameter Adam,
  per-parameter EMA, the adaptive weight from two full ``autograd.grad`` passes).

Steps are interleaved (ours, baseline, ours + checkpointing, baseline, ...) after one warm-up step of
each, so that machine load hits all alike; each cell is the median. Peak memory: the peak resident
memory during the step above the resident memory before it (Linux ``VmHWM``).

On a GPU (``--device cuda``) the variants run one after the other at each batch size (no load to
share): published-style fp32, ours fp32, ours bf16 + channels_last, and at the largest batch the
same with the encoder and generator compiled (``torch.compile``); peak memory is
``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_train_step.py                 # ~10 min on 2 idle cores
    python benchmarks/bench_train_step.py --repeats 1 --threads 2 --vgg ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth
    python benchmarks/bench_train_step.py --device cuda --batch-sizes 1 4 16
    python benchmarks/bench_train_step.py --tiny --repeats 1        # 32 px test networks: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_restoration import _reset_peak_rss, _status_kib, bench_device, load_average, machine_line  # noqa: E402
from random_weights import write_random_vgg16  # noqa: E402
from reference_impl import RefCodeFormer  # noqa: E402

from codeformer_lightning.checkpoints import published_to_native  # noqa: E402
from codeformer_lightning.models.cft import CFTModule  # noqa: E402
from codeformer_lightning.nn import CodeFormer, PatchDiscriminator  # noqa: E402

ADAM = dict(lr=5e-5, betas=(0.9, 0.99), weight_decay=0.0)  # published stage III, both optimisers
EMA_DECAY, GAN_WEIGHT, CE_WEIGHT, FEAT_WEIGHT = 0.997, 0.1, 0.5, 1.0


# ----------------------------------------------------------------------------- the published-style step
class PublishedStep:
    """``CodeFormerJointModel.optimize_parameters`` at a small-degradation step with GAN, w = 1."""

    def __init__(self, net: RefCodeFormer, disc: torch.nn.Module, lpips: torch.nn.Module) -> None:
        self.net, self.disc, self.lpips = net.train(), disc.train(), lpips
        # fix_modules: ['quantize', 'generator']
        for p in list(net.quantize.parameters()) + list(net.generator.parameters()):
            p.requires_grad = False
        self.ema = {k: v.detach().clone() for k, v in net.named_parameters()}
        self.opt_g = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], **ADAM)
        self.opt_d = torch.optim.Adam(disc.parameters(), **ADAM)
        self.last_layer = net.fuse_convs_dict[net.connect_list[-1]].shift[-1].weight

    def adaptive_weight(self, recon_loss: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        recon_grads = torch.autograd.grad(recon_loss, self.last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, self.last_layer, retain_graph=True)[0]
        return torch.clamp(torch.norm(recon_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1.0).detach()

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        lq, gt, idx_gt = batch["lq"], batch["gt"], batch["codes"]
        for p in self.disc.parameters():
            p.requires_grad = False
        self.opt_g.zero_grad()
        output, logits, lq_feat = self.net(lq, w=1, detach_16=True)
        s = self.net.latent
        quant_feat_gt = self.net.quantize.get_codebook_feat(idx_gt, shape=[gt.shape[0], s, s, self.net.emb_dim])
        l_total = torch.mean((quant_feat_gt.detach() - lq_feat) ** 2) * FEAT_WEIGHT
        l_total = l_total + F.cross_entropy(logits.permute(0, 2, 1), idx_gt) * CE_WEIGHT
        l_pix = F.l1_loss(output, gt)
        l_percep = self.lpips(output, gt).mean()
        l_g_gan = -self.disc(output).mean()
        d_weight = self.adaptive_weight(l_pix + l_percep, l_g_gan) * GAN_WEIGHT
        l_total = l_total + l_pix + l_percep + d_weight * l_g_gan
        l_total.backward()
        self.opt_g.step()
        with torch.no_grad():  # model_ema(decay): every EMA parameter, one at a time
            for k, v in self.net.named_parameters():
                self.ema[k].mul_(EMA_DECAY).add_(v.detach(), alpha=1 - EMA_DECAY)
        for p in self.disc.parameters():
            p.requires_grad = True
        self.opt_d.zero_grad()
        F.relu(1.0 - self.disc(gt)).mean().backward()
        F.relu(1.0 + self.disc(output.detach())).mean().backward()
        self.opt_d.step()


# ----------------------------------------------------------------------------- ours, under a Trainer
TINY_REF = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_res=(4,), codebook_size=64, emb_dim=32,
                groups=8, dim_embd=64, n_head=4, n_layers=2, connect_list=("8", "16"))
TINY_NET = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,), codebook_size=64,
                emb_dim=32, norm_groups=8, dim_embd=64, n_head=4, n_layers=2, fusion_resolutions=(8, 16))


class _Repeat(Dataset):
    def __init__(self, batch: dict[str, torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i % v.shape[0]] for k, v in self.batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Meter:
    """Seconds and peak memory (MiB) of one step: above the start on CPU, allocated on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.rss0, self.t0 = _reset_peak_rss(), time.perf_counter()

    def stop(self) -> dict[str, float]:
        _sync(self.device)
        seconds = time.perf_counter() - self.t0
        peak = (torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda"
                else (_status_kib("VmHWM") - self.rss0) / 1024)
        return dict(seconds=seconds, peak_mib=peak)


class StepTimer(pl.Callback):
    """Times each of our training steps after ``warmup``; on CPU interleaves the other variants.

    ``alternate``: checkpoint activations on every other step (timed as its own variant).
    ``baseline``: run and time one published-style step after each step without checkpointing.
    """

    def __init__(self, device: torch.device, warmup: int, name: str, alternate: bool = False,
                 baseline: tuple[PublishedStep, dict] | None = None) -> None:
        self.meter, self.warmup, self.name = _Meter(device), warmup, name
        self.alternate, self.baseline = alternate, baseline
        self.results: dict[str, list[dict[str, float]]] = {}

    def _variant(self, batch_idx: int) -> str:
        return f"{self.name} + checkpointing" if self.alternate and batch_idx % 2 else self.name

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        module.net.checkpoint_activations = self.alternate and batch_idx % 2 == 1
        self.meter.start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        ours, name = self.meter.stop(), self._variant(batch_idx)
        line = f"  step {batch_idx}: {name} {ours['seconds']:.2f} s"
        if batch_idx >= self.warmup:
            self.results.setdefault(name, []).append(ours)
        if self.baseline is not None and name == self.name:
            step, data = self.baseline
            self.meter.start()
            step(data)
            base = self.meter.stop()
            line += f", baseline {base['seconds']:.2f} s"
            if batch_idx >= self.warmup:
                self.results.setdefault("baseline (published-style)", []).append(base)
        print(line, flush=True)


def build(vgg: str, device: torch.device, batch_size: int, tiny: bool, seed: int = 0):
    """Our CFTModule, the published-style step and one batch, all with the same weights."""
    torch.manual_seed(seed)
    ref = RefCodeFormer(**TINY_REF) if tiny else RefCodeFormer()
    with torch.no_grad():  # non-trivial values everywhere (zero-initialised fusion would hide work)
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    net = CodeFormer(**TINY_NET) if tiny else CodeFormer()
    net.load_state_dict(published_to_native(ref.state_dict(), net))
    disc = PatchDiscriminator(n_layers=2 if tiny else 4)
    ref_disc = copy.deepcopy(disc)
    adam = functools.partial(torch.optim.Adam, fused=True, **ADAM)
    module = CFTModule(
        net=net, discriminator=disc, optimizer=adam, d_optimizer=adam, discriminator_from="random",
        perceptual_weights=vgg, disc_start_step=0, fidelity_schedule=1.0, small_degradation_every=1,
        gan_weight=GAN_WEIGHT, ce_weight=CE_WEIGHT, feat_weight=FEAT_WEIGHT, ema_decay=EMA_DECAY,
    )
    baseline = PublishedStep(ref.to(device), ref_disc.to(device), copy.deepcopy(module.lpips).to(device))
    return module, baseline, build_batch(net, batch_size, seed)


def build_batch(net: CodeFormer, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Smooth random ``lq`` and ``gt`` images ``(B, 3, S, S)`` in [-1, 1] and random target codes."""
    size, codes = net.img_size, net.latent_size**2
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(2 * batch_size, 3, size // 8, size // 8, generator=g), size=size,
                           mode="bilinear", align_corners=False) * 2 - 1
    batch = {"lq": smooth[:batch_size], "gt": smooth[batch_size:],
             "codes": torch.randint(0, net.config["codebook_size"], (batch_size, codes), generator=g)}
    return batch


def fit(module: CFTModule, batch: dict, steps: int, device: torch.device, timer: StepTimer, precision: str) -> None:
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision, max_steps=steps,
        logger=False, callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    n = batch["lq"].shape[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, DataLoader(_Repeat(batch, steps * n), batch_size=n))


def run_cpu(args, vgg: str) -> dict[int, dict[str, list[dict]]]:
    """Interleaved: ours, baseline, ours + checkpointing, ours, baseline, ..."""
    device, out = torch.device("cpu"), {}
    for bs in args.batch_sizes:
        module, baseline, batch = build(vgg, device, bs, args.tiny)
        warmup = 2  # one step of ours and of ours + checkpointing (and one of the baseline)
        timer = StepTimer(device, warmup, "ours (fused Adam)", alternate=True,
                          baseline=(baseline, {k: v.to(device) for k, v in batch.items()}))
        fit(module, batch, warmup + 2 * args.repeats, device, timer, "32-true")
        out[bs] = timer.results
    return out


def _time_baseline(baseline: PublishedStep, batch: dict, device: torch.device, warmup: int, repeats: int) -> list:
    data, meter, runs = {k: v.to(device) for k, v in batch.items()}, _Meter(device), []
    for i in range(warmup + repeats):
        meter.start()
        baseline(data)
        if i >= warmup:
            runs.append(meter.stop())
    return runs


def run_sequential(args, vgg: str, device: torch.device) -> dict[int, dict[str, list[dict] | str]]:
    """One variant after the other at each batch size (the GPU mode); out of memory is reported.

    One module and one baseline serve every batch size (each ``fit`` makes fresh optimisers); the
    compiled variant comes last, at the largest batch, since compiling changes the module for good.
    """
    out: dict[int, dict[str, list[dict] | str]] = {}
    torch.backends.cudnn.benchmark = True
    module, baseline, _ = build(vgg, device, 1, args.tiny)
    largest = max(args.batch_sizes)
    for bs in args.batch_sizes:
        batch = build_batch(module.net, bs)
        out[bs] = {}
        variants = [("ours fp32 eager", "32-true", torch.contiguous_format, False),
                    ("ours bf16 + channels_last", "bf16-mixed", torch.channels_last, False)]
        if args.compile == "only":
            variants = []
        if args.compile != "no" and (bs == largest or args.compile == "only"):
            variants.append(("ours bf16 + channels_last + compile", "bf16-mixed", torch.channels_last, True))
        try:
            out[bs]["baseline (published-style) fp32"] = _time_baseline(baseline, batch, device, 1, args.repeats)
        except torch.cuda.OutOfMemoryError:
            out[bs]["baseline (published-style) fp32"] = "out of memory"
        torch.cuda.empty_cache()
        for name, precision, memory_format, compiled in variants:
            if device.type == "cpu" and memory_format == torch.channels_last:
                # torch 2.13's CPU GroupNorm backward crashes (segfault) on a channels_last input that
                # needs no gradient while its affine weights do: the first fusion block's input here
                memory_format, name = torch.contiguous_format, name.replace(" + channels_last", "")
            try:
                module.net.to(memory_format=memory_format)
                if compiled and not getattr(module.net, "_bench_compiled", False):
                    # the networks' forward passes; the step's Python (losses, optimisers) stays eager
                    module.net.encoder.compile()
                    module.net.generator.compile()
                    module.net._bench_compiled = True
                timer = StepTimer(device, 2 if compiled else 1, name)
                fit(module, batch, timer.warmup + args.repeats, device, timer, precision)
                out[bs].update(timer.results)
            except torch.cuda.OutOfMemoryError:
                out[bs][name] = "out of memory"
            torch.cuda.empty_cache()
    return out


def time_adam(module: CFTModule, repeats: int) -> None:
    """One Adam step over the stage III generator-side parameters: per-parameter loop, foreach, fused."""
    params = [p for p in module.net.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    grads = [torch.randn_like(p) for p in params]
    print(f"\nAdam step over the {len(params)} trainable tensors ({n / 1e6:.1f} M values) of stage III:\n")
    print("| Adam | s/step | vs per-parameter loop |")
    print("|---|---:|---:|")
    results = {}
    kinds = {"per-parameter loop (published, CPU default)": dict(foreach=False), "foreach": dict(foreach=True),
             "fused": dict(fused=True)}
    copies = {k: [p.detach().clone().requires_grad_() for p in params] for k in kinds}
    opts = {k: torch.optim.Adam(copies[k], **ADAM, **kw) for k, kw in kinds.items()}
    for _ in range(repeats + 1):  # the first step creates the state: not timed
        for k, opt in opts.items():
            for p, g in zip(copies[k], grads):
                p.grad = g
            t = time.perf_counter()
            opt.step()
            results.setdefault(k, []).append(time.perf_counter() - t)
    base = statistics.median(results[next(iter(kinds))][1:])
    for k, ts in results.items():
        sec = statistics.median(ts[1:])
        print(f"| {k} | {sec:.3f} | {base / sec:.2f}x |")
    del copies, opts


def report(results: dict[int, dict[str, list[dict] | str]]) -> None:
    for bs, variants in results.items():
        base_runs = next((v for k, v in variants.items() if k.startswith("baseline")), None)
        base = statistics.median(r["seconds"] for r in base_runs) if isinstance(base_runs, list) else None
        print(f"\nbatch {bs}:\n")
        print("| variant | s/step | samples/s | vs baseline | peak memory MiB |")
        print("|---|---:|---:|---:|---:|")
        for name, runs in sorted(variants.items(), key=lambda kv: not kv[0].startswith("baseline")):
            if isinstance(runs, str):
                print(f"| {name} | {runs} | | | |")
                continue
            sec = statistics.median(r["seconds"] for r in runs)
            speed = f"{base / sec:.2f}x" if base else "n/a"
            print(f"| {name} | {sec:.3f} | {bs / sec:.3f} | {speed} | "
                  f"{statistics.median(r['peak_mib'] for r in runs):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps of each variant")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vgg", default=None, help="VGG16 weights (vgg16-397923af.pth); default: random weights")
    parser.add_argument("--tiny", action="store_true", help="32 px test networks (a smoke run)")
    parser.add_argument("--compile", choices=["yes", "no", "only"], default="yes",
                        help="sequential mode: compiled variant at the largest batch, none, or only it (every batch)")
    parser.add_argument("--sequential", action="store_true",
                        help="the GPU mode on any device: variants one after the other, bf16 and compile included")
    args = parser.parse_args()
    device = bench_device(args.device, args.threads)
    if device is None:
        return
    where = torch.cuda.get_device_name() if device.type == "cuda" else machine_line()
    print(f"# stage III training step, {'32' if args.tiny else '512'} px, {device}, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}\n{where}; load average before: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        vgg = args.vgg or write_random_vgg16(Path(tmp) / "vgg16_random.pth")
        if device.type == "cpu":
            time_adam(build(vgg, device, 1, args.tiny)[0], max(3, args.repeats))
        sequential = device.type == "cuda" or args.sequential
        results = run_sequential(args, vgg, device) if sequential else run_cpu(args, vgg)
    report(results)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
