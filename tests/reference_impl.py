"""A straightforward re-implementation of the *published* CodeFormer computation.

Written from ``shared/OFFICIAL_FORMAT.md`` in the published style on purpose: flat ``blocks`` lists
indexed by hard-coded positions, ``bmm`` attention, ``nn.MultiheadAttention`` in sequence-first
layout, ``topk`` code lookup. It loads the published key layout directly (no conversion), so
comparing it with :mod:`codeformer_lightning.nn` checks both the networks and the key converter.
Also the baseline of ``benchmarks/bench_restoration.py``. Not part of the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(c, groups=32):
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


def _swish(x):
    return x * torch.sigmoid(x)


class RefResBlock(nn.Module):
    def __init__(self, cin, cout=None, groups=32):
        super().__init__()
        cout = cin if cout is None else cout
        self.cin, self.cout = cin, cout
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.conv_out = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x_in):
        x = self.conv1(_swish(self.norm1(x_in)))
        x = self.conv2(_swish(self.norm2(x)))
        if self.cin != self.cout:
            x_in = self.conv_out(x_in)
        return x + x_in


class RefAttn(nn.Module):
    def __init__(self, c, groups=32):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        k = k.reshape(b, c, h * w)
        w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
        w_ = F.softmax(w_, dim=2)
        v = v.reshape(b, c, h * w)
        h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class RefDown(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class RefUp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class RefEncoder(nn.Module):
    def __init__(self, nf, ch_mult, res_blocks, resolution, attn_res, emb_dim, groups=32):
        super().__init__()
        blocks = [nn.Conv2d(3, nf, 3, 1, 1)]
        in_mult = (1,) + tuple(ch_mult)
        cur = resolution
        for i in range(len(ch_mult)):
            cin, cout = nf * in_mult[i], nf * ch_mult[i]
            for _ in range(res_blocks):
                blocks.append(RefResBlock(cin, cout, groups))
                cin = cout
                if cur in attn_res:
                    blocks.append(RefAttn(cin, groups))
            if i != len(ch_mult) - 1:
                blocks.append(RefDown(cin))
                cur //= 2
        blocks += [RefResBlock(cin, cin, groups), RefAttn(cin, groups), RefResBlock(cin, cin, groups)]
        blocks += [_norm(cin, groups), nn.Conv2d(cin, emb_dim, 3, 1, 1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class RefGenerator(nn.Module):
    def __init__(self, nf, ch_mult, res_blocks, resolution, attn_res, emb_dim, groups=32):
        super().__init__()
        cin = nf * ch_mult[-1]
        cur = resolution // 2 ** (len(ch_mult) - 1)
        blocks = [nn.Conv2d(emb_dim, cin, 3, 1, 1), RefResBlock(cin, cin, groups), RefAttn(cin, groups), RefResBlock(cin, cin, groups)]
        for i in reversed(range(len(ch_mult))):
            cout = nf * ch_mult[i]
            for _ in range(res_blocks):
                blocks.append(RefResBlock(cin, cout, groups))
                cin = cout
                if cur in attn_res:
                    blocks.append(RefAttn(cin, groups))
            if i != 0:
                blocks.append(RefUp(cin))
                cur *= 2
        blocks += [_norm(cin, groups), nn.Conv2d(cin, 3, 3, 1, 1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class RefQuantize(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.embedding = nn.Embedding(n, d)

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()
        zf = z.view(-1, z.shape[-1])
        e = self.embedding.weight
        d = (zf**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * torch.matmul(zf, e.t())
        _, idx = torch.topk(d, 1, dim=1, largest=False)
        onehot = torch.zeros(idx.shape[0], e.shape[0], device=z.device)
        onehot.scatter_(1, idx, 1)
        zq = torch.matmul(onehot, e).view(z.shape)
        loss = torch.mean((zq.detach() - z) ** 2) + 0.25 * torch.mean((zq - z.detach()) ** 2)
        zq = z + (zq - z).detach()
        return zq.permute(0, 3, 1, 2).contiguous(), loss, idx

    def get_codebook_feat(self, idx, shape):
        idx = idx.view(-1, 1)
        onehot = torch.zeros(idx.shape[0], self.embedding.weight.shape[0], device=idx.device)
        onehot.scatter_(1, idx, 1)
        zq = torch.matmul(onehot.float(), self.embedding.weight)
        return zq.view(shape).permute(0, 3, 1, 2).contiguous()


class RefVQAutoEncoder(nn.Module):
    def __init__(self, img_size=512, nf=64, ch_mult=(1, 2, 2, 4, 4, 8), res_blocks=2, attn_res=(16,),
                 codebook_size=1024, emb_dim=256, groups=32):
        super().__init__()
        self.encoder = RefEncoder(nf, ch_mult, res_blocks, img_size, attn_res, emb_dim, groups)
        self.quantize = RefQuantize(codebook_size, emb_dim)
        self.generator = RefGenerator(nf, ch_mult, res_blocks, img_size, attn_res, emb_dim, groups)

    def forward(self, x):
        zq, loss, idx = self.quantize(self.encoder(x))
        return self.generator(zq), loss, idx


class RefTransformerSALayer(nn.Module):
    def __init__(self, d, nhead, dim_mlp):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=0.0)
        self.linear1 = nn.Linear(d, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, tgt, query_pos):
        t2 = self.norm1(tgt)
        q = k = t2 + query_pos
        t2 = self.self_attn(q, k, value=t2)[0]
        tgt = tgt + t2
        t2 = self.norm2(tgt)
        return tgt + self.linear2(F.gelu(self.linear1(t2)))


class RefFuse(nn.Module):
    def __init__(self, c, groups=32):
        super().__init__()
        self.encode_enc = RefResBlock(2 * c, c, groups)
        self.scale = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(c, c, 3, 1, 1))
        self.shift = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, enc, dec, w=1):
        enc = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(enc) + self.shift(enc))


def _calc_mean_std(feat, eps=1e-5):
    b, c = feat.shape[:2]
    var = feat.view(b, c, -1).var(dim=2) + eps
    return feat.view(b, c, -1).mean(dim=2).view(b, c, 1, 1), var.sqrt().view(b, c, 1, 1)


def ref_adain(content, style):
    s_mean, s_std = _calc_mean_std(style)
    c_mean, c_std = _calc_mean_std(content)
    return (content - c_mean) / c_std * s_std + s_mean


class RefCodeFormer(RefVQAutoEncoder):
    """The published restoration network, generalised only in sizes (indices derived as published)."""

    def __init__(self, img_size=512, nf=64, ch_mult=(1, 2, 2, 4, 4, 8), res_blocks=2, attn_res=(16,),
                 codebook_size=1024, emb_dim=256, groups=32, dim_embd=512, n_head=8, n_layers=9,
                 connect_list=("32", "64", "128", "256")):
        super().__init__(img_size, nf, ch_mult, res_blocks, attn_res, codebook_size, emb_dim, groups)
        self.latent = img_size // 2 ** (len(ch_mult) - 1)
        self.emb_dim = emb_dim
        self.connect_list = list(connect_list)
        self.position_emb = nn.Parameter(torch.zeros(self.latent**2, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(*[RefTransformerSALayer(dim_embd, n_head, 2 * dim_embd) for _ in range(n_layers)])
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False))
        # The published tables, derived from the flat lists the same way they were written by hand:
        # encoder: output of each level's second ResBlock; generator: see OFFICIAL_FORMAT.md.
        self.channels, self.fuse_encoder_block, self.fuse_generator_block = {}, {}, {}
        res, idx = img_size, 0
        for i, mult in enumerate(ch_mult):
            self.channels[str(res)] = nf * mult
            attn = res in attn_res
            self.fuse_encoder_block[str(res)] = idx + (2 * res_blocks - 1 if attn else res_blocks)
            idx += res_blocks * (2 if attn else 1) + (1 if i != len(ch_mult) - 1 else 0)
            res = res // 2 if i != len(ch_mult) - 1 else res
        idx, res = 4, self.latent
        for i in reversed(range(len(ch_mult))):
            attn = res in attn_res
            first = idx
            self.fuse_generator_block[str(res)] = first + (2 * (res_blocks - 1) if attn else 0) if i == len(ch_mult) - 1 else first
            idx += res_blocks * (2 if attn else 1) + (1 if i != 0 else 0)
            res *= 2
        self.fuse_convs_dict = nn.ModuleDict({s: RefFuse(self.channels[s], groups) for s in self.connect_list})

    def forward(self, x, w=0, detach_16=True, code_only=False, adain=False):
        enc_feat = {}
        out_list = [self.fuse_encoder_block[s] for s in self.connect_list]
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in out_list:
                enc_feat[str(x.shape[-1])] = x.clone()
        lq_feat = x
        pos_emb = self.position_emb.unsqueeze(1).repeat(1, x.shape[0], 1)
        query = self.feat_emb(lq_feat.flatten(2).permute(2, 0, 1))
        for layer in self.ft_layers:
            query = layer(query, query_pos=pos_emb)
        logits = self.idx_pred_layer(query).permute(1, 0, 2)
        if code_only:
            return logits, lq_feat
        soft = F.softmax(logits, dim=2)
        _, top_idx = torch.topk(soft, 1, dim=2)
        quant = self.quantize.get_codebook_feat(top_idx, shape=[x.shape[0], self.latent, self.latent, self.emb_dim])
        if detach_16:
            quant = quant.detach()
        if adain:
            quant = ref_adain(quant, lq_feat)
        fuse_list = [self.fuse_generator_block[s] for s in self.connect_list]
        x = quant
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in fuse_list:
                s = str(x.shape[-1])
                if w > 0:
                    x = self.fuse_convs_dict[s](enc_feat[s].detach(), x, w)
        return x, logits, lq_feat
