"""Checkpoints of expert-parallel models: one expert shard per rank, resharded on load.

A checkpoint directory written by R ranks holds

    model.safetensors                       the replicated weights (written once, by rank 0)
    experts-00001-of-00004.safetensors      rank 1's expert shards, under the single-process
                                            names with the first dimension cut to E/R
    shards.json                             {"num_ranks": R, "experts": {name: E, ...}}
    state-00001-of-00004.pt                 rank 1's training state (optimizer, data sampler, RNG)

and a single-process checkpoint holds every weight in model.safetensors (and state.pt). Any
checkpoint loads into any layout: ``load_weights`` reads, for each expert parameter, only the
rows [r·E/R', (r+1)·E/R') that rank r of R' keeps (``safe_open`` slices, not whole files),
so 1 → R, R → 1 and R → R' give the same full weights and the same model outputs.
Optimizer moments of expert parameters are resharded the same way by ``load_training_state``.

``save_sharded_checkpoint`` is atomic across ranks: every rank writes into one temporary
directory, a barrier waits for all files to be on disk (fsync), then rank 0 renames it into
place; a crash at any point leaves the previous checkpoint or the new one, never a mix. The
ranks must share the run directory's filesystem (one machine, or a shared mount).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from moekit.distributed.env import barrier
from moekit.distributed.expert_parallel import ExpertShard, sharded_parameters

WEIGHTS_FILE = "model.safetensors"
SHARDS_FILE = "shards.json"
SINGLE_STATE_FILE = "state.pt"


class ShardedCheckpointError(ValueError):
    """A sharded checkpoint that cannot be read or does not fit the model; names the file."""


def expert_file(rank: int, num_ranks: int) -> str:
    return f"experts-{rank:05d}-of-{num_ranks:05d}.safetensors"


def state_file(rank: int, num_ranks: int) -> str:
    return SINGLE_STATE_FILE if num_ranks == 1 else f"state-{rank:05d}-of-{num_ranks:05d}.pt"


def _rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every state-dict name → all names sharing its storage (tied weights), itself included."""
    by_storage: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    names = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        by_storage.setdefault(key, []).append(name)
        names[name] = key
    return {name: by_storage[key] for name, key in names.items()}


def _unique_replicated(model: nn.Module, sharded: dict[str, ExpertShard]) -> dict[str, Tensor]:
    """The replicated tensors, one name per tied group (safetensors refuses shared storage)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        if name in sharded:
            continue
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def _fsync_dir_files(directory: Path, names: list[str]) -> None:
    for name in names:
        with open(directory / name, "rb") as handle:
            os.fsync(handle.fileno())


def write_weights(model: nn.Module, directory: Path) -> list[str]:
    """This rank's share of the weights into ``directory``; returns the files it wrote."""
    sharded = sharded_parameters(model)
    rank, num_ranks = _rank_and_size()
    written = []
    if sharded:
        experts = {name: model.get_parameter(name).detach().contiguous().cpu() for name in sharded}
        save_file(experts, str(directory / expert_file(rank, num_ranks)))
        written.append(expert_file(rank, num_ranks))
    if rank == 0:
        save_file(_unique_replicated(model, sharded), str(directory / WEIGHTS_FILE))
        written.append(WEIGHTS_FILE)
        if sharded:
            layout = {"num_ranks": num_ranks, "experts": {name: s.full_rows for name, s in sharded.items()}}
            (directory / SHARDS_FILE).write_text(json.dumps(layout, indent=2))
            written.append(SHARDS_FILE)
    return written


def read_layout(directory: Path) -> tuple[int, dict[str, int]]:
    """(ranks that wrote the checkpoint, sharded parameter → full first dimension)."""
    path = directory / SHARDS_FILE
    if not path.exists():
        return 1, {}
    try:
        layout = json.loads(path.read_text())
        return int(layout["num_ranks"]), {str(k): int(v) for k, v in layout["experts"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ShardedCheckpointError(f"{path}: unreadable shard layout ({error})") from error


def _read_rows(directory: Path, name: str, full_rows: int, source_ranks: int, start: int, stop: int) -> Tensor:
    """Rows [start, stop) of the full tensor ``name``, read from the source shards that hold them."""
    pieces = []
    per_source = full_rows // source_ranks
    for source in range(source_ranks):
        lo, hi = source * per_source, (source + 1) * per_source
        if hi <= start or lo >= stop:
            continue
        file = directory / (WEIGHTS_FILE if source_ranks == 1 else expert_file(source, source_ranks))
        with safe_open(str(file), framework="pt") as handle:
            if name not in handle.keys():
                raise ShardedCheckpointError(f"{file}: missing expert tensor {name}")
            pieces.append(handle.get_slice(name)[max(start, lo) - lo : min(stop, hi) - lo])
    return torch.cat(pieces, dim=0)


def _read_expert_rows(
    directory: Path,
    name: str,
    wanted: Tensor,
    source_ranks: int,
    source_experts: dict[str, int],
    target_shards: dict[str, ExpertShard],
) -> Tensor:
    """The rows of expert parameter ``name`` that this process keeps (all of them when unsharded)."""
    shard = target_shards.get(name)
    full_rows = source_experts.get(name) or wanted.shape[0] * (shard.num_ranks if shard else 1)
    shard = shard or ExpertShard(0, 1, full_rows)
    if shard.full_rows != full_rows:
        raise ShardedCheckpointError(
            f"{directory}: {name} has {full_rows} experts in the checkpoint, the model {shard.full_rows}"
        )
    rows = full_rows // shard.num_ranks
    return _read_rows(directory, name, full_rows, source_ranks, shard.rank * rows, (shard.rank + 1) * rows)


def load_weights(model: nn.Module, directory: str | Path) -> None:
    """Load a checkpoint written by any number of ranks into ``model``, sharded or not."""
    directory = Path(directory)
    source_ranks, source_experts = read_layout(directory)
    target_shards = sharded_parameters(model)
    aliases = _tied_aliases(model)
    wanted = model.state_dict()
    state: dict[str, Tensor] = {}
    replicated_path = directory / WEIGHTS_FILE
    if not replicated_path.exists():
        raise ShardedCheckpointError(f"{replicated_path}: missing weights file")
    try:
        with safe_open(str(replicated_path), framework="pt") as handle:
            stored = set(handle.keys())
            for name in wanted:
                if name in source_experts or (source_ranks == 1 and name in target_shards and name in stored):
                    state[name] = _read_expert_rows(directory, name, wanted[name], source_ranks, source_experts,
                                                    target_shards)
                    continue
                present = [alias for alias in aliases[name] if alias in stored]
                if not present:
                    raise ShardedCheckpointError(f"{replicated_path}: missing weight {name}")
                state[name] = handle.get_tensor(present[0])
    except (SafetensorError, OSError) as error:
        raise ShardedCheckpointError(f"{directory}: corrupt or unreadable weights ({error})") from error
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            raise ShardedCheckpointError(
                f"{directory}: {name} has shape {tuple(tensor.shape)} in the checkpoint, the model expects "
                f"{tuple(wanted[name].shape)}: the run's model config does not match"
            )
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------
# Training state (optimizer moments resharded like the weights)
# ---------------------------------------------------------------------------------------


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each index of ``optimizer.state_dict()``."""
    name_of = {id(param): name for name, param in model.named_parameters()}
    return [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]


def load_training_state(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, load_file: Callable[[Path], dict]
) -> dict:
    """This rank's training state from a checkpoint written by any number of ranks.

    ``load_file`` reads one state file (the trainer's ``load_state``, with its errors).

    Same number of ranks: the rank's own file, unchanged. Otherwise the optimizer's moments
    of expert parameters are cut from the concatenation of the source ranks' moments, the
    replicated ones come from the first source rank (they are equal on all), and the rest of
    the state (data sampler, RNG, history) from source rank ``rank mod R``.
    """
    source_ranks, source_experts = read_layout(directory)
    rank, num_ranks = _rank_and_size()
    if source_ranks == num_ranks:
        return load_file(directory / state_file(rank, num_ranks))
    sources = [load_file(directory / state_file(r, source_ranks)) for r in range(source_ranks)]
    state = dict(sources[rank % source_ranks])
    names = optimizer_param_names(model, optimizer)
    target_shards = sharded_parameters(model)
    saved_names = state.get("param_names", names)
    if saved_names != names:
        raise ShardedCheckpointError(f"{directory}: the optimizer's parameters do not match the model's")
    optimizer_state = {**sources[0]["optimizer"], "state": {}}
    for index, name in enumerate(names):
        per_source = [source["optimizer"]["state"].get(index) for source in sources]
        if per_source[0] is None:
            continue
        merged: dict[str, Any] = {}
        for key, value in per_source[0].items():
            if isinstance(value, Tensor) and value.dim() > 0 and (name in source_experts or name in target_shards):
                full = torch.cat([entry[key] for entry in per_source], 0) if name in source_experts else value
                shard = target_shards.get(name)
                if shard is not None:
                    rows = full.shape[0] // shard.num_ranks
                    full = full[shard.rank * rows : (shard.rank + 1) * rows].clone()
                merged[key] = full
            else:
                merged[key] = value
        optimizer_state["state"][index] = merged
    state["optimizer"] = optimizer_state
    return state


def save_sharded_checkpoint(run_dir: Path, model: nn.Module, state: dict, checkpoint_dir: str = "checkpoint") -> Path:
    """Every rank's weights and training state into ``run_dir/checkpoint_dir``, atomically."""
    rank, num_ranks = _rank_and_size()
    final = run_dir / checkpoint_dir
    tmp = run_dir / f"{checkpoint_dir}.tmp"
    old = run_dir / f"{checkpoint_dir}.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier("barrier before writing a checkpoint")
    written = write_weights(model, tmp)
    torch.save(state, tmp / state_file(rank, num_ranks))
    _fsync_dir_files(tmp, [*written, state_file(rank, num_ranks)])
    barrier("barrier after writing a checkpoint")
    if rank == 0:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier("barrier after renaming a checkpoint")
    return final
