"""Expert parallelism on 2 and 4 gloo ranks (forked by the test) against one process.

Verifies, in fp32 to 1e-5:
- dropless: each rank's output and input gradient equal the single-process layer's on that
  rank's tokens; an expert shard's gradient after backward equals the single-process
  gradient of Σ_r loss_r; after ``average_gradients`` every gradient (router, shared
  experts, experts) is that of mean_r loss_r
- experts with no rows, a rank whose experts receive nothing, a rank with no tokens
- capacity counted per rank (and that a global capacity would have given other outputs)
- aux-loss-free routers pool the ranks' load: replicated biases get the single-process update
- E not divisible by the ranks: ValueError naming both numbers
- checkpoints: 2 ranks → 1 process → 4 ranks (and 2 → 4) give the same model outputs;
  optimizer moments resharded; one data-parallel AdamW step equals the single-process step
  on the global batch; ``train(expert_parallel=2)`` resumes in one process
- failure: a peer that raises, is killed or hangs makes the other rank raise
  ExpertParallelError within seconds (a 3 s collective timeout); nothing waits forever

    pytest tests/test_parallel.py
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig, update_expert_bias
from moekit.distributed.checkpoint import load_training_state, load_weights, save_sharded_checkpoint
from moekit.distributed.expert_parallel import expert_major_order, expert_parallel, shard_experts
from moekit.distributed.grads import all_reduce_router_load, average_gradients, clip_grad_norm_
from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.training.checkpoint import load_state
from tests.ranks import results_of, run_ranks

D_MODEL = 16


def layer_config(scenario: str) -> MoEConfig:
    if scenario == "capacity":
        return MoEConfig(
            d_model=D_MODEL, d_ff=8, num_experts=8, top_k=1, router="switch", capacity_factor=1.0, min_capacity=0
        )
    return MoEConfig(d_model=D_MODEL, d_ff=8, num_experts=8, top_k=2, num_shared_experts=1, shared_expert_gate=True)


def make_layer(scenario: str, seed: int) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(layer_config(scenario))
    if scenario == "zero":
        # The last two experts can never win: their logits are -50·x0 and x0 >= 1.
        with torch.no_grad():
            layer.router.weight[6:] = 0.0
            layer.router.weight[6:, 0] = -50.0
    return layer


def rank_inputs(scenario: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    num_tokens = {"dropless": 3 + 2 * rank, "zero": 0 if rank == 1 else 4 + rank, "capacity": 8 + 4 * rank}[scenario]
    x = torch.randn(num_tokens, D_MODEL, generator=generator)
    if scenario == "zero":
        x[:, 0] = x[:, 0].abs() + 1
    return x, torch.randn(num_tokens, D_MODEL, generator=generator)


def layer_params(layer: MoE) -> dict[str, torch.nn.Parameter]:
    return dict(layer.named_parameters())


def _layer_worker(rank: int, num_ranks: int, scenario: str) -> dict:
    # Each rank builds its layer from another seed: expert_parallel broadcasts rank 0's.
    layer = expert_parallel(make_layer(scenario, seed=rank))
    x, upstream = rank_inputs(scenario, rank)
    x.requires_grad_(True)
    y = layer(x)
    (y * upstream).sum().backward()
    raw = {name: p.grad.clone() for name, p in layer_params(layer).items() if p.grad is not None}
    average_gradients(layer)
    averaged = {name: p.grad.clone() for name, p in layer_params(layer).items()}
    shapes = {name: tuple(p.shape) for name, p in layer_params(layer).items()}
    norm = clip_grad_norm_(layer, max_norm=1e-3)
    clipped = {name: p.grad.clone() for name, p in layer_params(layer).items()}
    return {
        "y": y.detach(), "x_grad": x.grad, "raw": raw, "averaged": averaged, "shapes": shapes,
        "norm": norm, "clipped": clipped,
    }


def single_process_reference(scenario: str, num_ranks: int) -> tuple[list, list, dict]:
    """Outputs and input gradients per rank, and the gradients of Σ_r loss_r."""
    layer = make_layer(scenario, seed=0)
    outputs, x_grads, total = [], [], 0.0
    xs = []
    for rank in range(num_ranks):
        x, upstream = rank_inputs(scenario, rank)
        x.requires_grad_(True)
        y = layer(x)
        outputs.append(y.detach())
        xs.append(x)
        total = total + (y * upstream).sum()
    params = layer_params(layer)
    grads = torch.autograd.grad(total, [*params.values(), *xs])
    x_grads = list(grads[len(params) :])
    return outputs, x_grads, dict(zip(params, grads[: len(params)], strict=True))


def block(tensor: torch.Tensor, rank: int, num_ranks: int) -> torch.Tensor:
    rows = tensor.shape[0] // num_ranks
    return tensor[rank * rows : (rank + 1) * rows]


def check_against_single_process(scenario: str, num_ranks: int, tmp_path: Path) -> None:
    results = results_of(run_ranks(_layer_worker, num_ranks, tmp_path, scenario))
    outputs, x_grads, grads = single_process_reference(scenario, num_ranks)
    expert_names = {"experts.w_in", "experts.w_out"}
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["y"], outputs[rank], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["x_grad"], x_grads[rank], atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            if name in expert_names:
                assert got["shapes"][name][0] == 8 // num_ranks, name  # single-process name, E/R rows
                torch.testing.assert_close(got["raw"][name], block(grad, rank, num_ranks), atol=1e-5, rtol=1e-5)
                want = block(grad, rank, num_ranks) / num_ranks
            else:
                want = grad / num_ranks
            torch.testing.assert_close(got["averaged"][name], want, atol=1e-5, rtol=1e-5, msg=name)
        # Clipping uses the norm over every rank's shards: the single-process norm.
        norm = torch.cat([(grad / num_ranks).reshape(-1) for grad in grads.values()]).norm()
        torch.testing.assert_close(got["norm"], norm, atol=1e-5, rtol=1e-5)
        for name in grads:
            torch.testing.assert_close(
                got["clipped"][name], got["averaged"][name] * 1e-3 / (norm + 1e-6), atol=1e-7, rtol=1e-4, msg=name
            )


@pytest.mark.distributed
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_dropless_outputs_and_grads_match_single_process(num_ranks: int, tmp_path: Path) -> None:
    check_against_single_process("dropless", num_ranks, tmp_path)


@pytest.mark.distributed
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_empty_experts_and_rank_without_tokens_match_single_process(num_ranks: int, tmp_path: Path) -> None:
    layer = make_layer("zero", seed=0)
    x, _ = rank_inputs("zero", 0)
    assert layer.router.weight.float().matmul(x.t())[6:].max() < 0  # experts 6, 7 get nothing
    assert rank_inputs("zero", 1)[0].shape[0] == 0
    check_against_single_process("zero", num_ranks, tmp_path)


@pytest.mark.distributed
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_capacity_is_counted_per_rank(num_ranks: int, tmp_path: Path) -> None:
    check_against_single_process("capacity", num_ranks, tmp_path)
    # The test can tell per-rank from global capacity: one process over all ranks' tokens
    # (one capacity for the global batch) drops other assignments.
    layer = make_layer("capacity", seed=0)
    per_rank = [layer(rank_inputs("capacity", r)[0]) for r in range(num_ranks)]
    global_batch = layer(torch.cat([rank_inputs("capacity", r)[0] for r in range(num_ranks)]))
    assert not torch.allclose(torch.cat(per_rank), global_batch)


def _aux_free_worker(rank: int, num_ranks: int) -> torch.Tensor:
    torch.manual_seed(0)
    layer = expert_parallel(MoE(MoEConfig(d_model=D_MODEL, d_ff=8, num_experts=8, top_k=2, router="aux_free")))
    layer(rank_inputs("dropless", rank)[0])
    all_reduce_router_load(layer)
    update_expert_bias(layer)
    return layer.router.expert_bias


@pytest.mark.distributed
def test_aux_free_bias_sees_every_rank_load_and_stays_replicated(tmp_path: Path) -> None:
    biases = results_of(run_ranks(_aux_free_worker, 2, tmp_path))
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=D_MODEL, d_ff=8, num_experts=8, top_k=2, router="aux_free"))
    for rank in range(2):  # one process, both ranks' tokens, one update: the pooled load
        layer(rank_inputs("dropless", rank)[0])
    update_expert_bias(layer)
    assert layer.router.expert_bias.abs().sum() > 0
    for bias in biases:
        torch.testing.assert_close(bias, layer.router.expert_bias)


def test_expert_major_order_hand_computed() -> None:
    # Arrived rank-major: rank 0 sends expert 0 one row [0] and expert 1 two [1, 2];
    # rank 1 sends expert 0 three rows [3, 4, 5] and expert 1 none.
    counts_RE = torch.tensor([[1, 2], [3, 0]])
    assert expert_major_order(counts_RE).tolist() == [0, 3, 4, 5, 1, 2]
    assert expert_major_order(torch.zeros(3, 2, dtype=torch.long)).tolist() == []


def _not_divisible_worker(rank: int, num_ranks: int) -> str:
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=6, top_k=2))
    # NOTE: no collective runs before the error, so a rank could exit while a slower peer is
    # still connecting its gloo mesh (which then fails with "connection closed by peer").
    dist.barrier()
    try:
        expert_parallel(layer)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.distributed
def test_experts_not_divisible_by_ranks_raises(tmp_path: Path) -> None:
    messages = results_of(run_ranks(_not_divisible_worker, 4, tmp_path))
    for message in messages:
        assert "num_experts=6" in message and "4 ranks" in message, message


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

LM = LMConfig(
    vocab_size=32, seq_len=8, n_layer=2, n_head=2, d_model=16,
    moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, num_shared_experts=1),
)


def lm_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7 + rank)
    ids = torch.randint(0, 32, (2, 9), generator=generator)
    return ids[:, :-1], ids[:, 1:]


EVAL_IDS = torch.arange(24).remainder(32).view(3, 8)


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    # NOTE: eps 1e-3, not 1e-8: Adam's first step is lr·g/(|g| + eps), which turns a 1e-9
    # gradient's rounding difference between the two computations into a full-size step.
    return torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)


def _save_worker(rank: int, num_ranks: int, directory: Path) -> torch.Tensor:
    torch.manual_seed(0)
    model = shard_experts(MoETransformerLM(LM))
    optimizer = make_optimizer(model)
    inputs, targets = lm_batch(rank)
    model(inputs, targets)[1].backward()
    average_gradients(model)
    optimizer.step()
    save_sharded_checkpoint(directory, model, {"optimizer": optimizer.state_dict()})
    model.eval()
    with torch.no_grad():
        return model(EVAL_IDS)[0]


def _load_worker(rank: int, num_ranks: int, directories: list[Path]) -> list[torch.Tensor]:
    torch.manual_seed(123)  # other weights than the checkpoint's: loading must replace them all
    model = shard_experts(MoETransformerLM(LM)).eval()
    logits = []
    for directory in directories:
        load_weights(model, directory)
        with torch.no_grad():
            logits.append(model(EVAL_IDS)[0])
    return logits


@pytest.mark.distributed
def test_checkpoint_reshards_2_to_1_to_4(tmp_path: Path) -> None:
    # One AdamW step of mean_r loss_r in one process must be the step the two ranks take.
    # (Built first: the forked ranks then inherit what the optimizer imports on first use.)
    torch.manual_seed(0)
    reference = MoETransformerLM(LM)
    reference_optimizer = make_optimizer(reference)
    loss = sum(reference(*lm_batch(rank))[1] for rank in range(2)) / 2
    loss.backward()
    reference_optimizer.step()
    reference.eval()

    two = tmp_path / "two"
    logits_2 = results_of(run_ranks(_save_worker, 2, tmp_path / "job2", two))
    checkpoint_2 = two / "checkpoint"
    assert sorted(p.name for p in checkpoint_2.iterdir()) == [
        "experts-00000-of-00002.safetensors", "experts-00001-of-00002.safetensors", "model.safetensors",
        "shards.json", "state-00000-of-00002.pt", "state-00001-of-00002.pt",
    ]

    # 2 ranks → 1 process: weights, optimizer moments, outputs.
    torch.manual_seed(99)
    single = MoETransformerLM(LM).eval()
    load_weights(single, checkpoint_2)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(single.get_parameter(name), param, atol=1e-5, rtol=1e-5, msg=name)
    optimizer = make_optimizer(single)
    state = load_training_state(checkpoint_2, single, optimizer, load_state)
    optimizer.load_state_dict(state["optimizer"])
    for name, param in reference.named_parameters():
        want, got = reference_optimizer.state[param], optimizer.state[single.get_parameter(name)]
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(got["exp_avg_sq"], want["exp_avg_sq"], atol=1e-9, rtol=1e-4, msg=name)
    with torch.no_grad():
        logits_1 = single(EVAL_IDS)[0]
        torch.testing.assert_close(logits_1, reference(EVAL_IDS)[0], atol=1e-5, rtol=1e-5)
    for logits in logits_2:
        torch.testing.assert_close(logits, logits_1, atol=1e-5, rtol=1e-5)

    # 1 process → 4 ranks (the single-process format of moekit train), and 2 → 4 directly.
    from moekit.training.checkpoint import save_checkpoint

    checkpoint_1 = save_checkpoint(tmp_path / "one", single, {"step": 1})
    for logits_1_to_4, logits_2_to_4 in results_of(
        run_ranks(_load_worker, 4, tmp_path / "job4", [checkpoint_1, checkpoint_2])
    ):
        torch.testing.assert_close(logits_1_to_4, logits_1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits_2_to_4, logits_1, atol=1e-5, rtol=1e-5)


def _train_worker(rank: int, num_ranks: int, out: Path) -> float:
    import os

    from moekit.training.config import TrainConfig
    from moekit.training.trainer import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(num_ranks))
    config = TrainConfig(
        steps=3, batch_size=2, eval_interval=3, eval_batches=1, log_interval=1, warmup_steps=1, max_minutes=None
    )
    lm = LMConfig(
        vocab_size=256, seq_len=16, n_layer=1, n_head=2, d_model=16,
        moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2),
    )
    return train(lm, config, out, progress=False, expert_parallel=num_ranks).val_loss


@pytest.mark.distributed
@pytest.mark.slow
def test_train_expert_parallel_then_resume_in_one_process(tmp_path: Path) -> None:
    from moekit.training.checkpoint import load_model_from_run
    from moekit.training.config import TrainConfig
    from moekit.training.trainer import train

    out = tmp_path / "run"
    val_losses = results_of(run_ranks(_train_worker, 2, tmp_path / "job", out))
    assert val_losses[0] == val_losses[1]  # every rank evaluates the same model on the same batches
    assert (out / "checkpoint" / "shards.json").exists() and (out / "results.json").exists()
    model, _ = load_model_from_run(out)
    assert model.blocks[0].ffn.experts.w_in.shape[0] == 4
    result = train(None, TrainConfig(steps=4), out, resume=True, progress=False)  # type: ignore[arg-type]
    assert result.steps == 4


# ---------------------------------------------------------------------------------------
# Failure: a dead or hung peer surfaces as an error within the collective timeout
# ---------------------------------------------------------------------------------------


def _failure_worker(rank: int, num_ranks: int, mode: str) -> None:
    import os
    import signal

    layer = expert_parallel(make_layer("dropless", seed=0))
    dist.barrier()
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # "hang": never reaches the all-to-all
    layer(rank_inputs("dropless", rank)[0])


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["raise", "kill", "hang"])
def test_failed_peer_makes_other_rank_exit_with_clear_error(mode: str, tmp_path: Path) -> None:
    started = time.monotonic()
    outcomes = run_ranks(
        _failure_worker, 2, tmp_path, mode, timeout_s=20.0, collective_timeout_s=3.0, wait_for=[0]
    )
    survivor = outcomes[0]
    assert survivor.exitcode == 1, survivor
    assert "ExpertParallelError" in survivor.error and "rank 0 of 2" in survivor.error, survivor.error
    assert "another rank raised, was killed, or did not reach" in survivor.error
    assert time.monotonic() - started < 15.0
