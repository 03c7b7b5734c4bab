"""Machine translation with the Transformer (Vaswani et al., "Attention Is All You Need", NeurIPS
2017) on WMT14 English→German, with fairseq's ``transformer_wmt_en_de`` shapes (Ott et al.,
"Scaling Neural Machine Translation", WMT 2018); the translation benchmark of MLPerf (quality
target 25.0 BLEU on newstest2014) and of the NG+ paper (Yang et al., arXiv 2106.07454).

Model (``torch.nn`` only; fairseq cannot be installed here): token embeddings scaled by √d plus
sinusoidal positions, ``layers`` encoder and ``layers`` decoder blocks, each with self-attention
(decoder: causal) [+ encoder–decoder attention] + a ReLU feed-forward block, residual dropout,
post-norm (the paper and fairseq's default) or pre-norm (``pre_norm``, with a final LayerNorm).
Attention uses explicit ``nn.Linear`` q/k/v/out projections and
``F.scaled_dot_product_attention`` so that every projection is a hookable module.  With
``share_embeddings`` (fairseq ``--share-all-embeddings``; needs the joined vocabulary) the
encoder input, decoder input and output projection share one matrix: the output layer is an
``nn.Linear`` whose ``weight`` *is* the embedding's.  Base shapes: 6+6 layers, d=512, FFN 2048,
8 heads, dropout 0.1.

Loss: cross-entropy with label smoothing 0.1 (``F.cross_entropy``'s uniform smoothing) averaged
over the non-pad target tokens of the (per-rank) batch.  ``loss`` returns as outputs the logits
of exactly those tokens (``(tokens, vocab)``); ``sampled_loss`` is the token-level
cross-entropy against targets drawn from their softmax.

Batches: length-bucketed; ``task.batch_by=sentences`` makes ``train.batch_size`` the number of
sentence pairs per global batch, ``task.batch_by=tokens`` the number of padded tokens
(``sentences × max(len(src), len(tgt))``, fairseq's ``--max-tokens``) per global batch; under
data parallelism each global batch is split into ``world_size`` contiguous parts (the per-rank
loss means are then averaged, a token-weighted mean only approximately).

Metrics: ``val_loss`` (mean token negative log-likelihood, natural log, no smoothing),
``val_ppl`` = exp(``val_loss``), ``val_bleu`` and ``val_chrf`` (sacrebleu, default 13a
tokenization, cased) of the greedy translations, detokenized by sentencepiece, of the
``task.eval_split`` split against its raw references.

Flavors: ``full`` reads ``task.dataset`` (``wmt14_en_de``) raw text from
``<task.data_root>/<dataset>``; ``tiny`` generates the English→German number-words corpus with
``num2words`` (see ``tasks._text_data``), trains a 128-piece sentencepiece model on it and uses
a 2+2-layer, d=64 model — whatever ``task.dataset`` says.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _text_data as td
from .base import DataNotFoundError, Task, TaskConfigError, epoch_permutation
from .config import TransformerConfig

DATASETS = TransformerConfig.DATASETS
BATCH_BY = ("sentences", "tokens")


# -- model --------------------------------------------------------------------------------
def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """``(n_positions, dim)``: sines of position × geometric frequencies in the first half of
    the features, cosines in the second half (the Tensor2Tensor/fairseq arrangement)."""
    half = dim // 2
    freq = torch.exp(
        -math.log(10_000.0) * torch.arange(half, dtype=torch.float64) / max(1, half - 1)
    )
    ang = torch.arange(n_positions, dtype=torch.float64)[:, None] * freq[None, :]
    table = torch.cat([ang.sin(), ang.cos()], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table.float()


class Attention(nn.Module):
    """Multi-head scaled dot-product attention with explicit q/k/v/out ``nn.Linear`` layers."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise TaskConfigError(f"task.arch.d_model={dim} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mem: Tensor, mask: Tensor | None) -> Tensor:
        """``x`` (B, Tq, d) attends to ``mem`` (B, Tk, d); ``mask`` broadcastable to
        (B, heads, Tq, Tk), True where attention is allowed."""
        b, tq, d = x.shape
        tk = mem.shape[1]
        h = self.heads
        q = self.q_proj(x).view(b, tq, h, d // h).transpose(1, 2)
        k = self.k_proj(mem).view(b, tk, h, d // h).transpose(1, 2)
        v = self.v_proj(mem).view(b, tk, h, d // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(o.transpose(1, 2).reshape(b, tq, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, act_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act_dropout = nn.Dropout(act_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act_dropout(F.relu(self.fc1(x))))


class Block(nn.Module):
    """Encoder block (``cross=False``) or decoder block (``cross=True``)."""

    def __init__(
        self, dim: int, heads: int, ffn: int, *, dropout: float, pre_norm: bool, cross: bool
    ):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = Attention(dim, heads)
        self.self_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads) if cross else None
        self.cross_norm = nn.LayerNorm(dim) if cross else None
        self.ffn = FeedForward(dim, ffn)
        self.ffn_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _sub(self, x: Tensor, norm: nn.Module, fn) -> Tensor:
        if self.pre_norm:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        mem: Tensor | None = None,
        mem_mask: Tensor | None = None,
    ) -> Tensor:
        x = self._sub(x, self.self_norm, lambda y: self.self_attn(y, y, self_mask))
        if self.cross_attn is not None:
            assert self.cross_norm is not None and mem is not None
            cross = self.cross_attn
            x = self._sub(x, self.cross_norm, lambda y: cross(y, mem, mem_mask))
        return self._sub(x, self.ffn_norm, self.ffn)


class Transformer(nn.Module):
    """Encoder–decoder Transformer over one joined vocabulary (``pad`` = 0)."""

    positions: Tensor  # a buffer (register_buffer below)

    def __init__(
        self,
        *,
        vocab_size: int,
        layers: int = 6,
        d_model: int = 512,
        ffn_dim: int = 2048,
        heads: int = 8,
        dropout: float = 0.1,
        pre_norm: bool = False,
        share_embeddings: bool = True,
        max_positions: int = 1024,
    ):
        super().__init__()
        self.d_model, self.pre_norm = d_model, pre_norm
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=td.PAD)
        self.tgt_embed = (
            self.embed
            if share_embeddings
            else nn.Embedding(vocab_size, d_model, padding_idx=td.PAD)
        )
        self.register_buffer(
            "positions", sinusoidal_table(max_positions, d_model), persistent=False
        )
        self.drop = nn.Dropout(dropout)
        kw: dict[str, Any] = {"dropout": dropout, "pre_norm": pre_norm}
        self.encoder = nn.ModuleList(
            Block(d_model, heads, ffn_dim, cross=False, **kw) for _ in range(layers)
        )
        self.decoder = nn.ModuleList(
            Block(d_model, heads, ffn_dim, cross=True, **kw) for _ in range(layers)
        )
        self.enc_norm = nn.LayerNorm(d_model) if pre_norm else None
        self.dec_norm = nn.LayerNorm(d_model) if pre_norm else None
        self.out_proj = nn.Linear(d_model, vocab_size, bias=False)
        # fairseq's initialization: Xavier-uniform linear weights, zero biases, N(0, d^-1/2)
        # embeddings with a zero pad row
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb in {id(self.embed): self.embed, id(self.tgt_embed): self.tgt_embed}.values():
            nn.init.normal_(emb.weight, std=d_model**-0.5)
            with torch.no_grad():
                emb.weight[td.PAD].zero_()
        if share_embeddings:
            self.out_proj.weight = self.tgt_embed.weight

    def _embed(self, emb: nn.Embedding, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.positions.shape[0]:
            raise ValueError(f"sequence length {t} exceeds max_positions={self.positions.shape[0]}")
        return self.drop(emb(tokens) * math.sqrt(self.d_model) + self.positions[:t])

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder states (B, S, d) and the key mask (B, 1, 1, S) of the source."""
        mask = (src != td.PAD)[:, None, None, :]
        x = self._embed(self.embed, src)
        for blk in self.encoder:
            x = blk(x, mask)
        if self.enc_norm is not None:
            x = self.enc_norm(x)
        return x, mask

    def decode(self, mem: Tensor, mem_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Decoder states (B, T, d) for the shifted target ``tgt_in``."""
        t = tgt_in.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt_in.device).tril()
        self_mask = causal[None, None] & (tgt_in != td.PAD)[:, None, None, :]
        x = self._embed(self.tgt_embed, tgt_in)
        for blk in self.decoder:
            x = blk(x, self_mask, mem, mem_mask)
        if self.dec_norm is not None:
            x = self.dec_norm(x)
        return x

    def forward(self, src: Tensor, tgt_in: Tensor, keep: Tensor | None = None) -> Tensor:
        """Logits (B, T, V), or with the boolean ``keep`` (B, T) only those of the kept
        positions, (N, V) in row-major order (the output layer then sees only those)."""
        mem, mem_mask = self.encode(src)
        h = self.decode(mem, mem_mask, tgt_in)
        if keep is not None:
            h = h[keep]
        return self.out_proj(h)

    @torch.no_grad()
    def greedy(self, src: Tensor, *, max_len: int) -> list[list[int]]:
        """Greedy translations of ``src`` (B, S): token ids without bos/eos."""
        mem, mem_mask = self.encode(src)
        b = src.shape[0]
        ys = torch.full((b, 1), td.BOS, dtype=torch.long, device=src.device)
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self.out_proj(self.decode(mem, mem_mask, ys)[:, -1]).argmax(-1)
            nxt = nxt.masked_fill(done, td.PAD)
            ys = torch.cat([ys, nxt[:, None]], dim=1)
            done |= nxt == td.EOS
            if bool(done.all()):
                break
        out = []
        for row in ys[:, 1:].tolist():
            toks = []
            for t in row:
                if t in (td.EOS, td.PAD):
                    break
                toks.append(t)
            out.append(toks)
        return out


# -- task ---------------------------------------------------------------------------------
class TransformerTask(Task):
    name = "transformer"
    config_class = TransformerConfig
    datasets = TransformerConfig.DATASETS
    metric_modes = {"val_loss": "min", "val_ppl": "min", "val_bleu": "max", "val_chrf": "max"}
    cfg: TransformerConfig

    def __init__(self, cfg: Mapping[str, Any] | TransformerConfig):
        super().__init__(cfg)
        c = self.cfg
        self.corpus = c.data_name
        self.arch = c.effective_arch
        self.vocab_size = c.effective_vocab_size
        self.label_smoothing = c.label_smoothing
        self.batch_by = c.effective_batch_by
        self.max_len = c.max_len
        self.eval_split = c.eval_split
        self.eval_batch_size = c.eval_batch_size
        self.bleu_sentences = c.bleu_sentences
        self.bucket = c.bucket_batches
        self.spm_model = c.spm_model
        self.spm_type = c.effective_spm_type
        self._sp: Any = None
        self._data: dict[str, td.Encoded] | None = None
        self._train_idx: np.ndarray | None = None
        self._spe: dict[int, int] = {}

    # -- data -------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.data_root / self.corpus

    @classmethod
    def prepare_data(cls, dataset: str, root: Path) -> str:
        """``numbers_en_de``: write the corpus and its 128-piece BPE sentencepiece model under
        ``root``.  ``wmt14_en_de``: check the raw text, train the 32k unigram sentencepiece
        model if absent and cache the encoded splits (the config's defaults)."""
        if dataset not in DATASETS:
            raise DataNotFoundError(
                f"unknown text data set {dataset!r}; valid choices: " + ", ".join(DATASETS)
            )
        flavor = "tiny" if dataset == "numbers_en_de" else "full"
        task = cls({"flavor": flavor, "dataset": dataset, "data_root": str(root)})
        data = task._load()
        return (
            f"{dataset}: {task.data_dir}: {len(data['train.en'])} train / "
            f"{len(data['valid.en'])} valid / {len(data['test.en'])} test sentence pairs, "
            f"sentencepiece model {task._spm_file()} ({task.vocab_size} pieces)"
        )

    def _spm_file(self) -> Path:
        return (
            Path(str(self.spm_model))
            if self.spm_model
            else td.spm_path(self.data_dir, self.vocab_size, self.spm_type)
        )

    def _load(self) -> dict[str, td.Encoded]:
        if self._data is not None:
            return self._data
        if self.corpus == "numbers_en_de":
            td.make_numbers_corpus(self.data_dir)
        td.check_raw(self.data_dir, self.corpus)
        path = self._spm_file()
        if not path.exists():
            if self.spm_model:
                raise DataNotFoundError(
                    f"task.spm_model={path} does not exist; set it to a sentencepiece .model "
                    "file (ids pad=0 unk=1 bos=2 eos=3) or to null to train one from train.*"
                )
            td.train_spm(
                self.data_dir, vocab_size=self.vocab_size, model_path=path, model_type=self.spm_type
            )
        self._sp = td.load_spm(path)
        if self._sp.get_piece_size() > self.vocab_size:
            raise TaskConfigError(
                f"task.vocab_size={self.vocab_size} is smaller than the sentencepiece model's "
                f"{self._sp.get_piece_size()} pieces ({path})"
            )
        # the tiny corpus encodes in milliseconds; the full one is cached beside the model
        cache = None if self.corpus == "numbers_en_de" else path.with_suffix("")
        self._data = {
            f"{s}.{lang}": td.encoded_split(self._sp, self.data_dir, s, lang, cache_dir=cache)
            for s in td.SPLITS
            for lang in td.LANGS
        }
        src, tgt = self._data["train.en"], self._data["train.de"]
        if len(src) != len(tgt):
            raise DataNotFoundError(
                f"{self.data_dir}: train.en has {len(src)} lines but train.de {len(tgt)}"
            )
        sl, tl = src.lengths(), tgt.lengths()
        ok = (sl > 0) & (tl > 0) & (sl < self.max_len) & (tl < self.max_len)
        self._train_idx = np.flatnonzero(ok)
        return self._data

    def num_train_examples(self) -> int:
        self._load()
        assert self._train_idx is not None
        return len(self._train_idx)

    def _global_batches(self, *, epoch: int, batch_size: int, seed: int) -> list[np.ndarray]:
        data = self._load()
        idx = self._train_idx
        assert idx is not None
        lengths = np.maximum(data["train.en"].lengths(), data["train.de"].lengths()) + 1
        perm = idx[epoch_permutation(len(idx), seed=seed, epoch=epoch).numpy()]
        rng = np.random.default_rng([seed, epoch, 7])
        if self.batch_by == "tokens" and batch_size < self.max_len:
            raise TaskConfigError(
                f"train.batch_size={batch_size} tokens is below task.max_len={self.max_len}: "
                "long sentences would not fit a batch"
            )
        return td.length_batches(
            lengths,
            perm,
            batch_size=batch_size,
            by=self.batch_by,
            bucket=self.bucket
            * (batch_size if self.batch_by == "sentences" else max(1, batch_size // 32)),
            rng=rng,
        )

    def steps_per_epoch(self, batch_size: int) -> int:
        if batch_size not in self._spe:
            self._spe[batch_size] = max(
                1, len(self._global_batches(epoch=0, batch_size=batch_size, seed=0))
            )
        return self._spe[batch_size]

    def train_batches(
        self, *, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[dict[str, Tensor]]:
        """Length-bucketed batches in an order fixed by ``(seed, epoch)``; each rank gets its
        contiguous part of every global batch (batches with fewer sentences than ranks are
        skipped)."""
        if self.batch_by == "sentences" and batch_size % world_size:
            raise TaskConfigError(
                f"train.batch_size={batch_size} must be divisible by the world size {world_size}"
            )
        data = self._load()
        src, tgt = data["train.en"], data["train.de"]
        for gb in self._global_batches(epoch=epoch, batch_size=batch_size, seed=seed):
            if len(gb) < world_size:
                continue
            part = np.array_split(gb, world_size)[rank]
            yield td.collate(src, tgt, part)

    # -- model and loss ---------------------------------------------------------------
    def build_model(self) -> nn.Module:
        a = self.arch
        return Transformer(
            vocab_size=self.vocab_size,
            layers=int(a.get("layers", 6)),
            d_model=int(a.get("d_model", 512)),
            ffn_dim=int(a.get("ffn_dim", 2048)),
            heads=int(a.get("heads", 8)),
            dropout=float(a.get("dropout", 0.1)),
            pre_norm=bool(a.get("pre_norm", False)),
            share_embeddings=bool(a.get("share_embeddings", True)),
            max_positions=max(1024, self.max_len + 2),
        )

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        keep = batch["tgt_out"] != td.PAD
        logits = model(batch["src"], batch["tgt_in"], keep=keep)
        loss = F.cross_entropy(logits, batch["tgt_out"][keep], label_smoothing=self.label_smoothing)
        return loss, logits

    def sampled_loss(self, outputs: Tensor) -> Tensor:
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(outputs.detach().float(), dim=-1), 1).squeeze(1)
        return F.cross_entropy(outputs, y)

    # -- evaluation -------------------------------------------------------------------
    def translate(self, model: nn.Module, lines_idx: np.ndarray, device: torch.device) -> list[str]:
        """Greedy, detokenized translations of the evaluation split's lines ``lines_idx``."""
        data = self._load()
        src = data[f"{self.eval_split}.en"]
        net: Any = getattr(model, "module", model)
        out: list[str] = [""] * len(lines_idx)
        order = np.argsort(src.lengths()[lines_idx], kind="stable")
        for s in range(0, len(order), self.eval_batch_size):
            part = order[s : s + self.eval_batch_size]
            batch = td.collate(src, src, lines_idx[part])["src"].to(device)
            max_len = min(int(1.2 * batch.shape[1]) + 10, self.max_len * 2)
            for j, toks in zip(part, net.greedy(batch, max_len=max_len), strict=True):
                out[int(j)] = self._sp.decode(toks)
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        import sacrebleu

        data = self._load()
        src, tgt = data[f"{self.eval_split}.en"], data[f"{self.eval_split}.de"]
        was_training = model.training
        model.eval()
        nll, ntok = 0.0, 0
        order = np.argsort(np.maximum(src.lengths(), tgt.lengths()), kind="stable")
        for s in range(0, len(order), self.eval_batch_size):
            batch = self.to_device(
                td.collate(src, tgt, order[s : s + self.eval_batch_size]), device
            )
            keep = batch["tgt_out"] != td.PAD
            logits = model(batch["src"], batch["tgt_in"], keep=keep).float()
            nll += float(F.cross_entropy(logits, batch["tgt_out"][keep], reduction="sum"))
            ntok += int(keep.sum())
        n = len(src) if self.bleu_sentences is None else min(len(src), self.bleu_sentences)
        lines = np.arange(n)
        hyps = self.translate(model, lines, device)
        refs = td.read_lines(self.data_dir / f"{self.eval_split}.de")[:n]
        model.train(was_training)
        val_loss = nll / max(1, ntok)
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
            "val_chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score),
        }
