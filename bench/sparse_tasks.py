"""The two offline tasks of bench_sparse_training.py: models and data, nothing downloaded.

- `charlm`: a GPT-2-style character-level LM (4 layers, d=128, 4 heads, MLP 4d, pre-LN, learned positions)
  on the Python standard library's own source (the installed .py files: always there, no download).
- `pairs`: a small CNN reading *both* digits of a pair of sklearn digits placed side by side in an 8x16
  image with random shifts and noise 0.25 (two 10-way heads; correct = both right). Digits alone is solved
  at ~98% by a tiny net and its L2 prune recovers in a few epochs; with the noise and two digits to get
  right (accuracy ~ p^2) lost capacity shows. (A pair *sum* label was tried first: it learns too slowly
  for a CPU budget, 70% after 1,200 steps.)
"""

from __future__ import annotations

import os
import sysconfig

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------ char LM


def stdlib_text(n_chars: int = 1_200_000) -> str:
    """Concatenated .py sources of the stdlib in sorted order (deterministic), ASCII only."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                s = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        s = s.encode("ascii", "replace").decode("ascii")
        parts.append(s)
        total += len(s)
        if total >= n_chars:
            break
    return "".join(parts)[:n_chars]


class CharData:
    def __init__(self, n_chars: int = 1_200_000, ctx: int = 64):
        text = stdlib_text(n_chars)
        chars = sorted(set(text))
        self.vocab = len(chars)
        idx = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([idx[c] for c in text], dtype=torch.long)
        n = int(len(data) * 0.9)
        self.train, self.val = data[:n], data[n:]
        self.ctx = ctx

    def batch(self, gen: torch.Generator, size: int, split: str = "train"):
        d = self.train if split == "train" else self.val
        i = torch.randint(0, len(d) - self.ctx - 1, (size,), generator=gen)
        x = torch.stack([d[j : j + self.ctx] for j in i.tolist()])
        y = torch.stack([d[j + 1 : j + 1 + self.ctx] for j in i.tolist()])
        return x, y

    def val_batches(self, size: int = 64, n: int = 8):
        g = torch.Generator().manual_seed(1234)
        return [self.batch(g, size, "val") for _ in range(n)]


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.n_heads = heads  # a name tritonprune.prune updates with the head count (it does not know `heads`)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, self.n_heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, d: int = 128, heads: int = 4, layers: int = 4, ctx: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, ctx, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def lm_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ------------------------------------------------------------------------------------------ pair sum


class PairData:
    """Two 8x8 digits side by side (8x16), shifted by up to 1 px, plus noise; label = (left, right)."""

    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target)
        g = torch.Generator().manual_seed(0)  # the digit split is fixed: the seeds vary the nets
        perm = torch.randperm(len(x), generator=g)
        n = int(len(x) * 0.7)
        self.tr = (x[perm[:n]], y[perm[:n]])
        self.te = (x[perm[n:]], y[perm[n:]])
        self.test = self._pairs(*self.te, 2000, torch.Generator().manual_seed(99))

    @staticmethod
    def _pairs(x, y, n, gen):
        i, j = torch.randint(0, len(x), (n,), generator=gen), torch.randint(0, len(x), (n,), generator=gen)
        img = torch.cat([x[i][:, None], x[j][:, None]], dim=3)  # [n, 1, 8, 16]
        dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
        img = torch.roll(img, shifts=(dy, dx), dims=(2, 3))
        img = img + 0.25 * torch.randn(img.shape, generator=gen)
        return img, torch.stack([y[i], y[j]], 1)

    def batch(self, gen: torch.Generator, size: int):
        return self._pairs(*self.tr, size, gen)


def conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PairNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 20):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(1, w), conv_bn(w, w), nn.MaxPool2d(2),
            conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            conv_bn(2 * w, 4 * w), nn.AdaptiveAvgPool2d((1, 2)),
        )
        self.fc1 = nn.Linear(8 * w, 4 * w)
        self.fc2 = nn.Linear(4 * w, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x).flatten(1))))


def ce_loss(model, x, y):
    out = model(x)
    return F.cross_entropy(out[:, :10], y[:, 0]) + F.cross_entropy(out[:, 10:], y[:, 1])


@torch.no_grad()
def accuracy(model, x, y, bs: int = 500) -> float:
    was = model.training
    model.eval()
    hits = 0
    for i in range(0, len(x), bs):
        out, t = model(x[i : i + bs]), y[i : i + bs]
        hits += ((out[:, :10].argmax(1) == t[:, 0]) & (out[:, 10:].argmax(1) == t[:, 1])).sum().item()
    model.train(was)
    return 100.0 * hits / len(x)


@torch.no_grad()
def val_loss(model, batches) -> float:
    was = model.training
    model.eval()
    out = sum(lm_loss(model, x, y).item() for x, y in batches) / len(batches)
    model.train(was)
    return out


