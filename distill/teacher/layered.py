"""Layered teacher pass: a teacher bigger than the device, one decoder layer at a time.

A chunk of samples (grouped in the same token-budget batches as the resident pass) is
embedded, then pushed through each decoder layer in turn: the layer's weights are read from
the memory-mapped safetensors checkpoint (the next layer's are read by a background thread
while this one computes), every batch of the chunk goes through it, and the layer is freed.
The activations wait in host memory between layers. Last come the final norm and the LM head
(in row chunks, :func:`~distill.teacher.extract.batch_targets`), exactly as in the resident
pass, so each layer's weights are read once per chunk instead of once per batch.

The layers are transformers' own modules (built on the meta device, weights assigned per
layer), with the model's rotary embedding and transformers' causal / sliding-window masks.
Supported: the Llama, Mistral and Qwen2 families (RoPE, GQA, tied or untied embeddings).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.data.dataset import Sample
from distill.errors import DistillError
from distill.format.shards import TargetSample
from distill.format.spec import TargetSpec
from distill.models import DTYPES
from distill.teacher.batching import pad_batch, token_budget_batches
from distill.teacher.extract import batch_targets

ARCHS = ("llama", "mistral", "qwen2")  # model_type values the layered pass is tested on
INDEX = "model.safetensors.index.json"


@dataclass
class LayeredStats:
    """Where a layered pass's time and bytes went (summed over chunks)."""

    chunks: int = 0
    tokens: int = 0  # real (unpadded) tokens through the model
    weight_bytes: int = 0  # bytes of weights read from the checkpoint
    load_seconds: float = 0.0  # spent reading weights (in the prefetch thread, mostly hidden)
    wait_seconds: float = 0.0  # the compute waited for weights: the streaming overhead
    seconds: float = 0.0  # wall time of the chunks
    layer_seconds: list[float] = field(default_factory=list)


class _Checkpoint:
    """Tensor name -> safetensors file, for one file or a sharded index."""

    def __init__(self, path: Path) -> None:
        if (path / INDEX).is_file():
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            self.files = {k: path / f for k, f in weight_map.items()}
        elif (path / "model.safetensors").is_file():
            from safetensors import safe_open

            f = path / "model.safetensors"
            with safe_open(f, framework="pt") as h:
                self.files = dict.fromkeys(h.keys(), f)
        else:
            raise DistillError(
                f"teacher.mode = 'layered' reads safetensors weights: {path} has neither "
                f"model.safetensors nor {INDEX}"
            )

    def read(self, prefix: str, dtype: torch.dtype, device: str) -> tuple[dict[str, Tensor], int]:
        """The tensors under ``prefix`` (names without it) and the bytes read.

        They are views of one buffer, so freeing them returns one large block to the system
        (many separate ones would fragment the heap, layer after layer). Each file is mapped
        only while its tensors are copied out."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k, f in self.files.items():
            if k.startswith(prefix):
                by_file.setdefault(f, []).append(k)
        shapes: dict[str, list[int]] = {}
        for f, keys in by_file.items():
            with safe_open(f, framework="pt") as h:
                shapes.update({k: h.get_slice(k).get_shape() for k in keys})
        buf = torch.empty(sum(math.prod(s) for s in shapes.values()), dtype=dtype, device=device)
        out, nbytes, off = {}, 0, 0
        for f, keys in by_file.items():
            with safe_open(f, framework="pt") as h:
                for k in keys:
                    t = h.get_tensor(k)
                    nbytes += t.numel() * t.element_size()
                    view = buf[off : off + t.numel()].view(t.shape)
                    view.copy_(t)
                    off += t.numel()
                    out[k[len(prefix) :]] = view
                    del t
        return out, nbytes

    def has(self, name: str) -> bool:
        return name in self.files


class LayeredTeacher:
    """A causal LM whose decoder layers are loaded one at a time (see the module docstring)."""

    def __init__(self, path: Path, dtype: str = "float32", device: str = "cpu") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise DistillError(f"cannot read the teacher config in {path}: {e}") from None
        if config.model_type not in ARCHS:
            raise DistillError(
                f"teacher.mode = 'layered' supports the {', '.join(ARCHS)} families, not "
                f"{config.model_type!r}; use teacher.mode = 'resident'"
            )
        self.dtype, self.device = DTYPES[dtype], device
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        self.config = config
        self.ckpt = _Checkpoint(path)
        base = self.model.model
        # the rotary embedding holds computed buffers, not weights: build it for real
        with torch.device(device):
            self.rotary = type(base.rotary_emb)(config=config)
        self.layer_types = _layer_types(config)
        self.stats = LayeredStats()

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def _head_name(self) -> str:
        tied = getattr(self.config, "tie_word_embeddings", False)
        return (
            "model.embed_tokens.weight"
            if tied or not self.ckpt.has("lm_head.weight")
            else ("lm_head.weight")
        )

    def _read(self, prefix: str, device: str | None = None) -> dict[str, Tensor]:
        t0 = time.perf_counter()
        out, nbytes = self.ckpt.read(prefix, self.dtype, device or self.device)
        if not out:
            raise DistillError(f"the teacher checkpoint has no tensors named {prefix}*")
        self.stats.weight_bytes += nbytes
        self.stats.load_seconds += time.perf_counter() - t0
        return out

    def _mask(self, layer_type: str, h: Tensor, attn: Tensor, pos: Tensor) -> Any:
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        fn = (
            create_sliding_window_causal_mask
            if layer_type == "sliding_attention"
            else create_causal_mask
        )
        return fn(
            config=self.config,
            inputs_embeds=h,
            attention_mask=attn,
            past_key_values=None,
            position_ids=pos,
        )

    @torch.no_grad()
    def compute_groups(
        self,
        groups: Sequence[Sequence[Sample]],
        spec: TargetSpec,
        batch_tokens: int,
        head_chunk: int,
        on_batch: Callable[[int], None] | None = None,
        seed: int = 0,
    ) -> list[list[TargetSample]]:
        """Targets of one chunk, given as groups of samples (shards), each in input order.

        Each group is batched on its own exactly as the resident pass batches it, so a group's
        targets do not depend on which other groups share its chunk (resume is exact)."""
        t_start = time.perf_counter()
        tick = on_batch or (lambda _n: None)
        batches: list[tuple[int, list[int], Tensor, Tensor]] = []
        for g, samples in enumerate(groups):
            lengths = [len(s.input_ids) for s in samples]
            for b in token_budget_batches(lengths, batch_tokens):
                ids, attn = pad_batch([samples[i].input_ids for i in b], pad_id=0)
                batches.append((g, b, ids, attn))
        embed = self._read("model.embed_tokens.", "cpu")["weight"]
        hidden: list[Tensor | None] = [
            torch.nn.functional.embedding(ids, embed) for _, _, ids, _ in batches
        ]
        del embed
        layers = self.model.model.layers
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-prefetch") as pool:
            nxt: Future[dict[str, Tensor]] = pool.submit(self._read, "model.layers.0.")
            for i, layer in enumerate(layers):
                t0 = time.perf_counter()
                weights = nxt.result()
                self.stats.wait_seconds += time.perf_counter() - t0
                if i + 1 < len(layers):
                    nxt = pool.submit(self._read, f"model.layers.{i + 1}.")
                layer.load_state_dict(weights, strict=True, assign=True)
                del weights
                t1 = time.perf_counter()
                for j, (*_, attn) in enumerate(batches):
                    hidden[j] = self._layer_forward(i, layer, hidden[j], attn)
                    tick(0)  # a stop check after every layer x batch
                self.stats.layer_seconds.append(time.perf_counter() - t1)
                layer.to("meta")  # frees the layer's weights
        out: list[list[TargetSample | None]] = [[None] * len(g) for g in groups]
        norm = self.model.model.norm
        norm.load_state_dict(self._read("model.norm."), strict=True, assign=True)
        head = self._read(self._head_name().removesuffix("weight"))["weight"]
        for j, (g, b, _ids, attn) in enumerate(batches):
            h = norm(hidden[j].to(self.device))  # type: ignore[union-attr]
            hidden[j] = None
            targets = batch_targets(h, groups[g], b, head, spec, head_chunk, seed)
            for i, t in zip(b, targets, strict=True):
                out[g][i] = t
            tick(int(attn.sum()))
        norm.to("meta")
        self.stats.chunks += 1
        self.stats.tokens += sum(int(a.sum()) for *_, a in batches)
        self.stats.seconds += time.perf_counter() - t_start
        return out  # type: ignore[return-value]

    def _layer_forward(self, i: int, layer: Any, h: Tensor | None, attn: Tensor) -> Tensor:
        """One batch through decoder layer ``i``; the result goes back to host memory."""
        assert h is not None
        x = h.to(self.device)
        a = attn.to(self.device)
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        y = layer(
            x,
            attention_mask=self._mask(self.layer_types[i], x, a, pos),
            position_embeddings=self.rotary(x, pos),
            position_ids=pos,
            past_key_values=None,
            use_cache=False,
        )
        y = y[0] if isinstance(y, tuple) else y
        return y.to("cpu")


def _layer_types(config: Any) -> list[str]:
    """Each layer's attention, as the family's model builds its masks: Qwen2 by
    ``config.layer_types``; Mistral a sliding window everywhere when ``sliding_window`` is set;
    Llama full causal attention (a stray ``sliding_window`` in its config is ignored, as the
    model ignores it)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    sliding = config.model_type == "mistral" and getattr(config, "sliding_window", None)
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def chunk_groups(sizes: Sequence[int], chunk_tokens: int) -> list[list[int]]:
    """Consecutive group indices whose tokens add up to at most ``chunk_tokens`` (a group
    larger than that is a chunk of its own)."""
    chunks: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if chunks and total + n <= chunk_tokens:
            chunks[-1].append(i)
            total += n
        else:
            chunks.append([i])
            total = n
    return chunks
