"""Routing traces: which experts each token used, per MoE layer, saved as one .npz file.

A trace is what an expert cache sees: per layer, the experts of every token in the order the
tokens ran. ``moekit.inference.policy_sim`` replays it against cache policies.

Recording: ``with record_routing(model) as recorder: model(ids)`` wraps ``MoE.route`` on every
moekit MoE layer inside ``model`` (its own LM, and transformers models patched by
``patch_moe``, whose ``PatchedMoE`` layers are ``MoE`` subclasses) for the duration of the
block and appends each forward's choices; ``recorder.trace(...)`` builds the ``RoutingTrace``.
``record_trace(model, ids, ...)`` does this over a token sequence in windows of batch 1.
Tokens are recorded in the order a forward flattens them (batch-major), so record with batch
1 for a decoding order. What is recorded is the router's choices: in eval mode without an
``eval_capacity_factor`` (dropless, the inference default) they are exactly the experts run.

Where the weights came from is part of the trace (``source``, ``trained``): a router with
random weights routes by accident, not by what the tokens are (on moekit's init it piles most
tokens onto a few experts, which makes caching look easier than on the trained model: see
docs/offload.md), so a trace from an untrained model says nothing about the locality an expert
cache meets in use.

File format (``np.savez_compressed``; read with ``allow_pickle=False``):
    metadata            0-d str: JSON (format, version, model, source, trained, text,
                        num_tokens, layers, num_experts, top_k, expert_bytes, created, moekit)
    tokens              int32 [T] token ids (empty when not given)
    layer{i}.experts    int16 [T_i, K_i]: layer i's experts per token, in choice order;
                        -1 = no expert at that slot (a dropped choice, or fewer than K_i)
    layer{i}.forward    int32 [T_i]: index of the forward call each token ran in

Shape suffixes: T tokens, K choices per token, N assignments, S sequence.
"""

from __future__ import annotations

import contextlib
import json
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import moekit
from moekit.experts import GroupedExperts, ModuleExperts
from moekit.inference.quant import QuantizedExperts
from moekit.layer import MoE, moe_layers, observe_routing, wrapped_routes
from moekit.routing import RoutingResult, TopKRouter, _selected_per_expert, topk_assignments

__all__ = [
    "LayerTrace", "RoutingRecorder", "RoutingReplay", "RoutingTrace", "TraceError", "record_routing", "record_trace",
    "replay_routing",
]

TRACE_FORMAT = "moekit-routing-trace"
TRACE_VERSION = 1


class TraceError(ValueError):
    """A trace file that cannot be read, or bad input to a trace function."""


@dataclass
class LayerTrace:
    name: str  # qualified module name, e.g. "blocks.3.ffn"
    num_experts: int
    top_k: int  # the layer's configured k
    experts_TK: np.ndarray  # int16, -1 = empty slot
    forward_T: np.ndarray  # int32


@dataclass
class RoutingTrace:
    layers: list[LayerTrace]
    tokens_T: np.ndarray  # int32, may be empty
    metadata: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.layers[0].experts_TK.shape[0]) if self.layers else 0

    @property
    def trained(self) -> bool:
        return bool(self.metadata.get("trained"))

    def save(self, path: str | Path) -> Path:
        """Write the .npz file (``path`` gets the .npz suffix numpy adds when missing)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = {"metadata": np.array(json.dumps(self.metadata, sort_keys=True)), "tokens": self.tokens_T}
        for i, layer in enumerate(self.layers):
            arrays[f"layer{i}.experts"] = layer.experts_TK.astype(np.int16)
            arrays[f"layer{i}.forward"] = layer.forward_T.astype(np.int32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        path = Path(path)
        if not path.is_file():
            raise TraceError(f"{path}: no such trace file")
        try:
            with np.load(path, allow_pickle=False) as data:
                metadata = json.loads(str(data["metadata"]))
                if metadata.get("format") != TRACE_FORMAT:
                    raise TraceError(f"{path}: not a moekit routing trace (format {metadata.get('format')!r})")
                if metadata.get("version") != TRACE_VERSION:
                    raise TraceError(
                        f"{path}: trace version {metadata.get('version')} is not supported (this moekit reads "
                        f"{TRACE_VERSION})"
                    )
                layers = [
                    LayerTrace(
                        name, int(num_experts), int(top_k),
                        data[f"layer{i}.experts"].astype(np.int16), data[f"layer{i}.forward"].astype(np.int32),
                    )
                    for i, (name, num_experts, top_k) in enumerate(
                        zip(metadata["layers"], metadata["num_experts"], metadata["top_k"], strict=True)
                    )
                ]
                tokens_T = data["tokens"].astype(np.int32)
        except TraceError:
            raise
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
            raise TraceError(f"{path}: corrupt or truncated trace file ({type(error).__name__}: {error})") from error
        for layer in layers:
            if layer.experts_TK.size and (layer.experts_TK.max() >= layer.num_experts or layer.experts_TK.min() < -1):
                raise TraceError(f"{path}: layer {layer.name} names experts outside 0..{layer.num_experts - 1}")
        return cls(layers, tokens_T, metadata)


def expert_bytes(layer: MoE) -> int:
    """Bytes of one routed expert's weights as the layer holds them (the largest one)."""
    experts = layer.experts
    if isinstance(experts, GroupedExperts):
        tensors = [experts.w_in, experts.w_out] + [b for b in (experts.b_in, experts.b_out) if b is not None]
        return sum(t[0].numel() * t.element_size() for t in tensors)
    if isinstance(experts, ModuleExperts):
        return max(sum(p.numel() * p.element_size() for p in module.parameters()) for module in experts.experts)
    if isinstance(experts, QuantizedExperts):
        return max(expert.nbytes for expert in experts.experts)
    return 0


class RoutingRecorder:
    """Collects each MoE layer's choices per forward while ``record_routing`` is active."""

    def __init__(self, layers: list[tuple[str, MoE]]) -> None:
        self.layers = layers
        self.choices: dict[str, list[np.ndarray]] = {name: [] for name, _ in layers}
        self.forward_index: dict[str, int] = {name: 0 for name, _ in layers}

    def add(self, name: str, routing: RoutingResult, num_tokens: int) -> None:
        a = routing.assignments
        token_N = a.token_idx_N.detach().cpu().numpy()
        expert_N = a.expert_idx_N.detach().cpu().numpy()
        counts_T = np.bincount(token_N, minlength=num_tokens)
        width = max(int(counts_T.max()) if counts_T.size else 0, 1)
        # NOTE: assignments are token-major (Assignments' contract), so a token's choices are
        # consecutive; within a token they are in rank order (top-k routers) or expert order.
        order = np.argsort(token_N, kind="stable")
        token_sorted = token_N[order]
        slot_N = np.arange(token_sorted.size) - (np.cumsum(counts_T) - counts_T)[token_sorted]
        experts_TK = np.full((num_tokens, width), -1, dtype=np.int16)
        experts_TK[token_sorted, slot_N] = expert_N[order]
        self.choices[name].append(experts_TK)

    def trace(
        self,
        *,
        source: str,
        trained: bool,
        model: str,
        text: str,
        tokens: Sequence[int] | Tensor | np.ndarray | None = None,
        extra: dict | None = None,
    ) -> RoutingTrace:
        """The recorded routing as a trace. ``source`` says where the weights came from (a run
        directory and step, a transformers folder, "random init"), ``trained`` whether they were
        trained (a random router's choices are not a trained one's), ``model`` what the model is, ``text`` what
        ran through it; ``tokens`` the ids in the recorded order, when known."""
        if not source or not model or not text:
            raise TraceError("a trace needs a non-empty source, model and text: they say what the trace is")
        layers = []
        for name, layer in self.layers:
            chunks = self.choices[name]
            if not chunks:
                raise TraceError(f"MoE layer {name or '<model>'} saw no tokens while recording")
            width = max(chunk.shape[1] for chunk in chunks)
            padded = [np.pad(c, ((0, 0), (0, width - c.shape[1])), constant_values=-1) for c in chunks]
            forward_T = np.concatenate([np.full(c.shape[0], i, dtype=np.int32) for i, c in enumerate(chunks)])
            experts_TK = np.concatenate(padded)
            layers.append(LayerTrace(name, layer.config.num_experts, layer.config.top_k, experts_TK, forward_T))
        tokens_T = np.asarray(tokens.cpu() if isinstance(tokens, Tensor) else tokens if tokens is not None else [])
        tokens_T = tokens_T.astype(np.int32).reshape(-1)
        if tokens_T.size and tokens_T.size != layers[0].experts_TK.shape[0]:
            raise TraceError(
                f"tokens has {tokens_T.size} ids but layer {layers[0].name} saw {layers[0].experts_TK.shape[0]} tokens"
            )
        metadata = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "model": model,
            "source": source,
            "trained": bool(trained),
            "text": text,
            "num_tokens": int(layers[0].experts_TK.shape[0]),
            "layers": [layer.name for layer in layers],
            "num_experts": [layer.num_experts for layer in layers],
            "top_k": [layer.top_k for layer in layers],
            "expert_bytes": [expert_bytes(layer) for _, layer in self.layers],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "moekit": moekit.__version__,
            **(extra or {}),
        }
        return RoutingTrace(layers, tokens_T, metadata)


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecorder]:
    """Within the block, every forward of ``model``'s MoE layers is recorded; the layers are
    restored on exit, even on an error. Nested MoE layers are recorded too."""
    layers = moe_layers(model)
    if not layers:
        raise TraceError(f"{type(model).__name__} has no moekit MoE layer to record")
    recorder = RoutingRecorder(layers)
    with observe_routing(model, recorder.add):
        yield recorder


@torch.no_grad()
def record_trace(
    model: nn.Module,
    ids_T: Tensor,
    window: int,
    *,
    source: str,
    trained: bool,
    model_name: str,
    text: str,
    extra: dict | None = None,
) -> RoutingTrace:
    """Run ``ids_T`` through ``model`` (eval mode, batch 1) in consecutive windows of ``window``
    tokens, one forward each, and return the trace. A causal model routes each token of a
    window as decoding it would (same context), so this records a decoding order at the cost of
    a prefill."""
    if ids_T.dim() != 1 or ids_T.numel() == 0:
        raise TraceError(f"token ids must be a non-empty 1-D tensor, got shape {tuple(ids_T.shape)}")
    if window < 1:
        raise TraceError(f"window={window} is invalid: must be >= 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with record_routing(model) as recorder:
            for start in range(0, ids_T.numel(), window):
                model(ids_T[start : start + window][None].to(device))
    finally:
        model.train(was_training)
    return recorder.trace(source=source, trained=trained, model=model_name, text=text, tokens=ids_T, extra=extra)


class RoutingReplay:
    """The position of ``replay_routing`` in its trace: per model layer, the trace position of
    the next token it routes. ``reset(position)`` puts every layer there (a new generation)."""

    def __init__(self, trace: RoutingTrace, num_layers: int, start: int) -> None:
        self.trace = trace
        self.positions = [start] * num_layers

    def reset(self, position: int = 0) -> None:
        self.positions = [position] * len(self.positions)

    def take(self, layer_index: int, count: int) -> np.ndarray:
        """The next ``count`` tokens' experts for model layer ``layer_index`` ([count, K]): from the
        trace's layer ``layer_index mod (its layers)``, wrapping around at its end."""
        source = self.trace.layers[layer_index % len(self.trace.layers)].experts_TK
        rows = (self.positions[layer_index] + np.arange(count)) % source.shape[0]
        self.positions[layer_index] += count
        return source[rows]


@contextlib.contextmanager
def replay_routing(model: nn.Module, trace: RoutingTrace, start: int = 0) -> Iterator[RoutingReplay]:
    """Within the block, ``model``'s MoE layers route as ``trace`` says: model layer i takes the
    experts of the trace's layer i mod (its layers), token after token from position ``start``
    (wrapping around at the trace's end), in the order the forwards flatten their tokens (batch
    1 for a decoding order). The combine weights are the layer's own router scores at those
    experts, normalized over the k and scaled as its top-k router does, so every expert still
    computes as usual; only the choice is the trace's.

    What it is for: a model with random weights routes by accident (docs/offload.md), so an
    expert cache sees no trained model's locality; replaying a trained model's trace gives the
    cache that locality while the benchmark keeps its large random model. Layers must use the
    top-k router with the trace layer's number of experts and k; the trace must be dropless
    (no empty slots). The layers are restored on exit, even on an error.
    """
    layers = moe_layers(model)
    if not layers:
        raise TraceError(f"{type(model).__name__} has no moekit MoE layer to route")
    if not trace.layers or trace.num_tokens == 0:
        raise TraceError("the routing trace is empty")
    for index, (name, layer) in enumerate(layers):
        source = trace.layers[index % len(trace.layers)]
        config = layer.config
        if not isinstance(layer.router, TopKRouter) or config.n_group > 1:
            raise TraceError(f"layer {name}: router {config.router!r} (n_group {config.n_group}) cannot replay a "
                             "trace: replay needs the plain top-k router")
        if (config.num_experts, config.top_k) != (source.num_experts, source.experts_TK.shape[1]):
            raise TraceError(
                f"layer {name} has {config.num_experts} experts, top-{config.top_k}; the trace's layer "
                f"{source.name} has {source.num_experts} experts, {source.experts_TK.shape[1]} choices per token"
            )
        if (source.experts_TK < 0).any():
            raise TraceError(f"the trace's layer {source.name} has empty slots (dropped choices): replay needs a "
                             "dropless trace")
    replay = RoutingReplay(trace, len(layers), start)
    index_of = {name: index for index, (name, _) in enumerate(layers)}

    def wrap(name: str, layer: MoE):
        original, index = layer.route, index_of[name]

        def route(x_TD: Tensor, capacity_factor: float | None) -> RoutingResult:
            routed = original(x_TD, capacity_factor)
            config = layer.config
            ids_TK = torch.from_numpy(replay.take(index, x_TD.shape[0]).astype(np.int64)).to(x_TD.device)
            weights_TK = routed.scores_TE.gather(1, ids_TK)
            if config.normalize_weights:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
            if config.routed_scaling_factor != 1.0:
                weights_TK = weights_TK * config.routed_scaling_factor
            return RoutingResult(
                routed.logits_TE, routed.scores_TE, topk_assignments(ids_TK, weights_TK, routed.scores_TE),
                _selected_per_expert(ids_TK, config.num_experts),
            )

        return route

    with wrapped_routes(model, wrap):
        yield replay
