"""Centroid learning by distillation (LUT-NN): k-means codebooks refined end to end.

The replaced layers become `pq_layer` modules inside a torch view of the model
(`torch_view.OnnxModule`); the fp32 model (the same view, nothing replaced) is the teacher.
The loss matches every float output, each normalized by its mean square:
sum_o mean((student_o - teacher_o)^2) / mean(teacher_o^2), plus cross-entropy on the first
output when labels are given, plus (`LearnConfig.layer_loss` > 0) that weight times the
mean normalized MSE of the replaced layers' outputs. No other parameter moves unless
`LearnConfig.train_weights` (the replaced layers' weights) or `LearnConfig.train_bias` (a
shift of their outputs, added to their bias).
Samples are run one at a time (their shapes are bound) and `batch` of them make one Adam
step. Training stops after `epochs` or `minutes` (checked after every step), saves a
checkpoint after every epoch and resumes from it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .codebooks import LutLayer, make_tables
from .config import LearnConfig
from .calibration import Feeds
from .pq_layer import PQConv2d, PQLayer, PQLinear
from .torch_view import OnnxModule


def pq_module(layer: LutLayer, train_weights: bool = False, train_bias: bool = False) -> torch.nn.Module:
    """The PQ module that replaces `layer`'s ONNX node (its bias: the graph adds it)."""
    plan = layer.plan
    candidate = plan.candidate
    shift = layer.bias - layer.own_bias  # learned with train_bias
    pq = PQLayer(layer.centroids, plan.rule.weight_matrix(candidate), str(layer.tables.dtype), train_weights,
                 layer.correction, shift if train_bias or shift.any() else None, train_bias)
    if candidate.conv is None:
        return PQLinear(pq)
    a = candidate.conv
    return PQConv2d(pq, tuple(candidate.weight_shape[2:]), a.strides, a.padding, a.dilation)


def student_view(onnx_model, layers: list[LutLayer], train_weights: bool = False,
                 train_bias: bool = False) -> OnnxModule:
    """The model with each layer's ONNX node computed by its PQ module."""
    return OnnxModule(onnx_model, {layer.plan.candidate.name: pq_module(layer, train_weights, train_bias)
                                   for layer in layers})


def _tensors(feeds: Feeds) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized MSE over the float outputs (+ cross-entropy of output 0 with labels)."""
    loss = sum(
        torch.mean((s - t) ** 2) / (torch.mean(t**2) + 1e-12)
        for s, t in zip(student, teacher) if t.is_floating_point()
    )
    if labels is not None:
        logits = student[0].reshape(len(labels), -1)
        loss = loss + torch.nn.functional.cross_entropy(logits, labels)
    return loss


def learn_centroids(onnx_model, layers: list[LutLayer], samples: list[Feeds], cfg: LearnConfig,
                    labels: np.ndarray | None = None, seed: int = 0,
                    progress: bool = True) -> tuple[list[LutLayer], dict]:
    """Refine `layers` (k-means) on `samples` (training feeds; labels int [S, batch]).

    Returns new LutLayers (learned centroids, their tables and scales, bias + learned shift)
    and what the training did (`distill`'s stats)."""
    student = student_view(onnx_model, layers, cfg.train_weights, cfg.train_bias)
    key = _layer_names(layers) + [f"train weights {cfg.train_weights}, bias {cfg.train_bias}"]
    stats = distill(onnx_model, student, samples, cfg, labels, seed, progress, key, "learn centroids")
    learned = [_learned(layer, student.replaced[student.slots[layer.plan.candidate.name]].pq) for layer in layers]
    return learned, stats


def distill(onnx_model, student: OnnxModule, samples: list[Feeds], cfg: LearnConfig,
            labels: np.ndarray | None, seed: int, progress: bool, key: list[str],
            desc: str) -> dict:
    """Train the trainable parameters of `student` (a view of `onnx_model` with some nodes
    replaced) to match the fp32 model on `samples` (`distillation_loss`). `key` names what
    a checkpoint must match to be resumed.

    Returns {"epochs", "resumed_from", "seconds", "loss": [per epoch, mean per sample]}."""
    torch.manual_seed(seed)
    teacher = OnnxModule(onnx_model).eval()
    outputs = len(teacher.outputs)
    if cfg.layer_loss > 0:  # the replaced nodes' outputs, from both models
        teacher.taps = student.taps = [n.output[0] for n in student.nodes if n.name in student.slots]
    inputs = [_tensors(s) for s in samples]
    with torch.no_grad():
        targets = [teacher(**x) for x in inputs]
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    start_epoch = _resume(cfg.checkpoint, student, optimizer, key)
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    deadline = started + cfg.minutes * 60
    losses = []
    bar = tqdm(range(start_epoch, cfg.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        total, seen = 0.0, 0
        order = rng.permutation(len(inputs))
        for start in range(0, len(order), cfg.batch):
            optimizer.zero_grad()
            batch = order[start:start + cfg.batch]
            for i in batch:
                y = None if labels is None else torch.from_numpy(labels[i].astype(np.int64))
                out = student(**inputs[i])
                loss = distillation_loss(out[:outputs], targets[i][:outputs], y)
                if student.taps:
                    loss = loss + cfg.layer_loss * distillation_loss(out[outputs:], targets[i][outputs:]) / len(student.taps)
                (loss / len(batch)).backward()
                total, seen = total + float(loss.detach()), seen + 1
            optimizer.step()
            if time.monotonic() > deadline:
                break
        losses.append(round(total / seen, 6))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
        # a partial epoch (out of time) counts as done: the checkpoint holds its steps
        _save(cfg.checkpoint, student, optimizer, key, epoch + 1)
        if time.monotonic() > deadline:
            break
    student.taps = []
    return {"epochs": start_epoch + len(losses), "resumed_from": start_epoch,
            "seconds": round(time.monotonic() - started, 1), "loss": losses}


def _learned(layer: LutLayer, pq: PQLayer) -> LutLayer:
    centroids, tables, scale, shift = pq.exported()
    correction = layer.correction
    if isinstance(pq.weight, torch.nn.Parameter):  # trained weights: their share of the tables, P . (W' - W),
        # joins the correction, so that views made of the layer compute these tables
        original = layer.plan.rule.weight_matrix(layer.plan.candidate)
        moved = make_tables(centroids, pq.weight.detach().numpy().reshape(original.shape) - original)
        correction = moved if correction is None else correction + moved
    return replace(layer, centroids=centroids, tables=tables, scale=scale, bias=layer.own_bias + shift,
                   correction=correction, snr_db=None)


def _layer_names(layers: list[LutLayer]) -> list[str]:
    """What a checkpoint must match: each layer's name, codebook shape, table correction and bias."""
    return [f"{layer.plan.candidate.name}:{'x'.join(map(str, layer.centroids.shape))}"
            + ("" if layer.correction is None else f":fit {float(np.abs(layer.correction).sum()):.9g}")
            + f":bias {float(np.abs(layer.bias).sum()):.9g}"
            for layer in layers]


def _save(path: str | None, student: OnnxModule, optimizer, key: list[str], epoch: int) -> None:
    if path is None:
        return
    state = {"epoch": epoch, "layers": key, "student": student.replaced.state_dict(),
             "optimizer": optimizer.state_dict()}
    tmp = Path(path).with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def _resume(path: str | None, student: OnnxModule, optimizer, key: list[str]) -> int:
    """The epoch to start from: a checkpoint with the same key (layers and shapes) is loaded, else 0."""
    if path is None or not Path(path).exists():
        return 0
    state = torch.load(path, weights_only=True)
    if state.get("layers") != key:
        return 0
    student.replaced.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"])
