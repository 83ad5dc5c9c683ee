"""Record the routing of every MoE layer of a moekit LM over labelled text files.

The probe: each file (its name is the domain) is tokenized and cut into evenly spaced,
non-overlapping windows of the model's context length; the windows run through the model in
eval mode, and each MoE layer's router output (``MoE.route``) is kept for every token:
its choices by rank, their weights, and the router entropy. Nothing in the layer changes:
``capture_routing`` wraps ``route`` on the layer instances for the duration of a ``with``
block and puts the method back afterwards.

Capacity: the inspection forward runs in eval mode, dropless unless the run sets
``eval_capacity_factor``. When the run trains with a capacity (``capacity_factor`` not None),
``kept_TK`` replays the training capacity (moekit.capacity.apply_capacity, same groups and
priority) on the recorded choices, batch by batch of the training batch size: what training
drops on such batches.

Shape suffixes: B batch, S sequence, T tokens, K choices per token, E experts, N assignments.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from moekit.capacity import apply_capacity, expert_capacity
from moekit.layer import MoE, moe_layers, observe_routing
from moekit.routing import Assignments, RoutingResult


class InspectError(ValueError):
    """Bad input to ``moekit inspect``; the message starts with the flag it concerns."""


@dataclass
class LayerRouting:
    """The routing of one MoE layer over the whole probe."""

    name: str  # qualified module name, e.g. "blocks.3.ffn"
    block: int  # transformer block index (Mixtral's "layer")
    num_experts: int
    expert_TK: np.ndarray  # int64, the router's choices by rank; -1 = no choice at that rank
    weight_TK: np.ndarray  # float32 combine weights
    entropy_T: np.ndarray  # float32 router entropy per token, nats
    kept_TK: np.ndarray | None = None  # bool, survived the training capacity; None = dropless


@dataclass
class Probe:
    """The tokens the model saw, with where they came from."""

    domains: list[str]
    token_T: np.ndarray  # int64 token ids
    domain_T: np.ndarray  # int64 index into domains
    sequence_T: np.ndarray  # int64 window index (a window never spans two domains)
    position_T: np.ndarray  # int64 position inside the window
    windows: list[np.ndarray] = field(default_factory=list)  # the windows, in probe order


def load_probe(files: list[Path], tokenizer, seq_len: int, tokens_per_domain: int) -> Probe:
    """Evenly spaced, non-overlapping windows of ``seq_len`` tokens from each file, at most
    ``tokens_per_domain`` tokens per file; a file shorter than one window is one short window."""
    from moekit.training.data import DataError, read_text

    domains, windows, domain_of_window = [], [], []
    for file in files:
        try:
            text, _ = read_text(file)
        except DataError as error:
            raise InspectError(f"--data: {error}") from error
        name = file.stem or file.name
        if name in domains:
            raise InspectError(
                f"--data: two files are named {name!r} ({file}); the file name is the domain, rename one"
            )
        tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if tokens.size < 2:
            raise InspectError(f"--data: data file {file}: has {tokens.size} token(s); need at least 2")
        domains.append(name)
        if tokens.size <= seq_len:
            starts = np.array([0])
            length = tokens.size
        else:
            count = max(1, min(tokens_per_domain // seq_len, tokens.size // seq_len))
            starts = np.linspace(0, tokens.size - seq_len, count).astype(np.int64)
            length = seq_len
        for start in starts:
            windows.append(tokens[start : start + length])
            domain_of_window.append(len(domains) - 1)
    lengths = np.array([w.size for w in windows])
    return Probe(
        domains=domains,
        token_T=np.concatenate(windows),
        domain_T=np.repeat(np.array(domain_of_window), lengths),
        sequence_T=np.repeat(np.arange(len(windows)), lengths),
        position_T=np.concatenate([np.arange(n) for n in lengths]),
        windows=windows,
    )


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[dict[str, list[RoutingResult]]]:
    """Within the block, every ``MoE.route`` result of ``model``'s MoE layers is appended to
    ``captured[name]`` (detached); the layers are restored on exit, even on an error."""
    captured: dict[str, list[RoutingResult]] = {name: [] for name, _ in moe_layers(model)}
    with observe_routing(model, lambda name, result, tokens: captured[name].append(result)):
        yield captured


def assignments_to_table(
    token_N: np.ndarray, expert_N: np.ndarray, order_N: np.ndarray, num_tokens: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat assignments → a [T, width] table of experts, each token's row sorted by
    ``order_N`` (ascending), -1 where a token has fewer choices; also the index into the flat
    list of each cell (-1 where empty), so other per-assignment fields can follow."""
    by_token = np.lexsort((order_N, token_N))
    token_sorted = token_N[by_token]
    counts_T = np.bincount(token_sorted, minlength=num_tokens)
    starts_T = np.cumsum(counts_T) - counts_T
    slot_N = np.arange(token_sorted.size) - starts_T[token_sorted]
    expert_TK = np.full((num_tokens, width), -1, dtype=np.int64)
    index_TK = np.full((num_tokens, width), -1, dtype=np.int64)
    fits = slot_N < width
    expert_TK[token_sorted[fits], slot_N[fits]] = expert_N[by_token][fits]
    index_TK[token_sorted[fits], slot_N[fits]] = by_token[fits]
    return expert_TK, index_TK


def _training_keep(assignments: Assignments, num_tokens: int, batch: int, seq: int, layer: MoE) -> Tensor:
    """Which assignments survive the training capacity on a [batch, seq] input (the layer's
    own rule: moekit.capacity with the config's groups, priority and capacity)."""
    config = layer.config
    group_idx_T, group_tokens, num_groups = None, num_tokens, 1
    if config.routing_group == "sequence":
        group_tokens, num_groups = seq, batch
        group_idx_T = torch.arange(num_tokens) // seq
    if config.expert_capacity is not None:
        capacity = config.expert_capacity
    else:
        capacity = expert_capacity(
            group_tokens, config.num_experts, config.top_k, config.capacity_factor, config.min_capacity
        )
    # NOTE: apply_capacity keeps a subset in order; carrying each assignment's own index in
    # the weight field (unused by it) tells which ones it kept.
    keep_key = torch.arange(len(assignments))
    tagged = Assignments(
        assignments.token_idx_N, assignments.expert_idx_N, keep_key.float(), assignments.rank_N, assignments.score_N
    )
    kept, _ = apply_capacity(
        tagged, num_tokens, config.num_experts, capacity, config.drop_priority, group_idx_T, num_groups
    )
    keep_N = torch.zeros(len(assignments), dtype=torch.bool)
    keep_N[kept.weight_N.long()] = True
    return keep_N


def _entropy(scores_TE: Tensor) -> Tensor:
    # NOTE: sigmoid routers (aux_free) give scores that do not sum to 1; normalize first.
    p_TE = scores_TE.float() / scores_TE.float().sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return -(p_TE * p_TE.clamp_min(1e-30).log()).sum(dim=-1)


@torch.no_grad()
def record_routing(
    model: nn.Module, probe: Probe, batch_size: int, progress: bool = True, desc: str = "routing"
) -> list[LayerRouting]:
    """Run the probe's windows through ``model`` (eval mode) and collect each MoE layer's
    routing over every token, in probe order."""
    from tqdm import tqdm

    layers = moe_layers(model)
    if not layers:
        raise InspectError("MODEL: has no MoE layer (a dense model); inspect needs an MoE model")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Windows of equal length batch together; a short window (a file shorter than the
    # context) goes alone.
    batches: list[list[int]] = []
    current: list[int] = []
    for i, window in enumerate(probe.windows):
        if current and (len(current) == batch_size or probe.windows[current[0]].size != window.size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    window_start = np.concatenate([[0], np.cumsum([w.size for w in probe.windows])])
    parts: dict[str, dict[str, list[np.ndarray]]] = {
        name: {"expert": [], "weight": [], "entropy": [], "kept": [], "rows": []} for name, _ in layers
    }
    try:
        with capture_routing(model) as captured:
            for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, disable=not progress, leave=False):
                idx_BS = torch.from_numpy(np.stack([probe.windows[i] for i in batch])).to(device)
                for records in captured.values():
                    records.clear()
                model(idx_BS)
                rows_T = np.concatenate([np.arange(window_start[i], window_start[i + 1]) for i in batch])
                for name, layer in layers:
                    (routing,) = captured[name]
                    _collect(parts[name], routing, layer, rows_T, idx_BS.shape)
    finally:
        model.train(was_training)
    result = []
    num_tokens = probe.token_T.size
    for name, layer in layers:
        p = parts[name]
        rows_T = np.concatenate(p["rows"])
        width = (
            p["expert"][0].shape[1] if layer.config.router != "expert_choice" else max(e.shape[1] for e in p["expert"])
        )
        routing = LayerRouting(
            name=name,
            block=_block_index(name),
            num_experts=layer.config.num_experts,
            expert_TK=_place(p["expert"], rows_T, num_tokens, width, -1, np.int64),
            weight_TK=_place(p["weight"], rows_T, num_tokens, width, 0.0, np.float32),
            entropy_T=_place([e[:, None] for e in p["entropy"]], rows_T, num_tokens, 1, 0.0, np.float32)[:, 0],
            kept_TK=_place(p["kept"], rows_T, num_tokens, width, False, bool) if p["kept"][0] is not None else None,
        )
        result.append(routing)
    return result


def _collect(part: dict, routing: RoutingResult, layer: MoE, rows_T: np.ndarray, shape_BS: torch.Size) -> None:
    assignments = routing.assignments
    num_tokens = routing.scores_TE.shape[0]
    token_N = assignments.token_idx_N.cpu().numpy()
    expert_N = assignments.expert_idx_N.cpu().numpy()
    if layer.config.router == "expert_choice":
        # Expert choice's rank is a token's place in its expert's list; a token's own order
        # of preference is its router score.
        order_N = -assignments.score_N.float().cpu().numpy()
        width = int(np.bincount(token_N, minlength=num_tokens).max()) if token_N.size else 1
    else:
        order_N = assignments.rank_N.cpu().numpy()
        width = layer.config.top_k
    expert_TK, index_TK = assignments_to_table(token_N, expert_N, order_N, num_tokens, width)
    weight_N = assignments.weight_N.detach().float().cpu().numpy()
    part["expert"].append(expert_TK)
    part["weight"].append(np.where(index_TK >= 0, weight_N[np.maximum(index_TK, 0)], 0.0))
    part["entropy"].append(_entropy(routing.scores_TE).cpu().numpy())
    part["rows"].append(rows_T)
    config = layer.config
    dropless = config.capacity_factor is None and config.expert_capacity is None
    if dropless or config.router == "expert_choice":  # expert choice: capacity is in its routing
        part["kept"].append(None)
        return
    keep_N = _training_keep(assignments, num_tokens, shape_BS[0], shape_BS[1], layer).numpy()
    part["kept"].append(np.where(index_TK >= 0, keep_N[np.maximum(index_TK, 0)], False))


def _place(
    pieces: list[np.ndarray], rows_T: np.ndarray, num_tokens: int, width: int, fill: object, dtype: type
) -> np.ndarray:
    out = np.full((num_tokens, width), fill, dtype=dtype)
    start = 0
    for piece in pieces:
        rows = rows_T[start : start + piece.shape[0]]
        out[rows, : piece.shape[1]] = piece
        start += piece.shape[0]
    return out


def _block_index(name: str) -> int:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "blocks" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


def token_pieces(tokens: list[int], tokenizer) -> list[tuple[str, int]]:
    """Decoded text of consecutive tokens as (piece, index of its first token): tokens that
    only decode together (a UTF-8 character split over byte tokens) form one piece."""
    pieces: list[tuple[str, int]] = []
    pending: list[int] = []
    first = 0
    for i, token in enumerate(tokens):
        if not pending:
            first = i
        pending.append(int(token))
        text = tokenizer.decode(pending)
        if "\ufffd" in text and len(pending) < 4 and i + 1 < len(tokens):
            continue
        pieces.append((text, first))
        pending = []
    return pieces


def piece_per_token(tokens: np.ndarray, tokenizer) -> list[str]:
    """One string per token for classification: each token's piece, repeated over the tokens
    that decode together."""
    out = [""] * len(tokens)
    pieces = token_pieces(tokens.tolist(), tokenizer)
    for j, (text, first) in enumerate(pieces):
        end = pieces[j + 1][1] if j + 1 < len(pieces) else len(tokens)
        for t in range(first, end):
            out[t] = text
    return out


def vocab_piece(token_id: int, tokenizer) -> str:
    """A readable label of one token id: whitespace made visible, lone bytes as \\xNN."""
    if getattr(tokenizer, "kind", "") == "bytes" and token_id >= 128:
        return f"\\x{token_id:02x}"
    text = tokenizer.decode([token_id])
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
