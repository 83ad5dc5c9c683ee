"""Every hand-written ``torch.autograd.Function`` in moekit, checked by ``gradcheck`` in float64.

``gradcheck`` compares each Function's backward with finite differences of its forward.
In float64, grouped_mm (float32/bf16 only) is not available, so the grouped matmuls take the
per-expert loop; tests/test_experts.py checks the grouped_mm path against that loop. Covered:

    moekit.experts.GroupedMatmul                        (also through the multi-task experts)
    moekit.fused._ExpertsUp, moekit.fused._ExpertsDownCombine   (every activation, an empty expert)
    moekit.layer._ContiguousGrad
    moekit.distributed.expert_parallel._AllToAll        on a one-process gloo group
    moekit.experiments.bench.expert_parallel._Stamp

and a scan of the package's sources fails when a Function is added without a check here.

    pytest tests/test_autograd_functions.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.autograd import gradcheck

from moekit.dispatch import make_plan
from moekit.distributed.expert_parallel import _AllToAll, all_to_all, set_all_to_all_observer
from moekit.experiments.bench.expert_parallel import AllToAllMeter, _Stamp
from moekit.experts import GroupedMatmul
from moekit.fused import _ExpertsDownCombine, _ExpertsUp
from moekit.layer import _ContiguousGrad
from moekit.models.multitask import ExpertLayer
from moekit.routing import Assignments

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "moekit"
CHECKED = {
    "moekit.experts.GroupedMatmul",
    "moekit.fused._ExpertsUp",
    "moekit.fused._ExpertsDownCombine",
    "moekit.layer._ContiguousGrad",
    "moekit.distributed.expert_parallel._AllToAll",
    "moekit.experiments.bench.expert_parallel._Stamp",
}
DOUBLE = dict(dtype=torch.float64)


def test_every_autograd_function_in_the_package_is_checked_here():
    found = set()
    for path in PACKAGE_ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(base).endswith("Function") for base in node.bases):
                found.add(f"{module}.{node.name}")
    assert found == CHECKED


def _plan():
    # T=3 tokens, E=3 experts, top-2, expert 1 empty: (0, 2) (0, 0) (1, 0) (1, 2) (2, 2) (2, 0).
    pairs = [(0, 2), (0, 0), (1, 0), (1, 2), (2, 2), (2, 0)]
    assignments = Assignments(
        token_idx_N=torch.tensor([t for t, _ in pairs]),
        expert_idx_N=torch.tensor([e for _, e in pairs]),
        weight_N=torch.rand(6, **DOUBLE),
        rank_N=torch.tensor([0, 1] * 3),
        score_N=torch.zeros(6),
    )
    plan = make_plan(assignments, num_tokens=3, num_experts=3)
    assert plan.tokens_per_expert == (3, 0, 3)
    return plan


def test_grouped_matmul_gradcheck():
    torch.manual_seed(0)
    counts = [2, 0, 3]
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows = torch.randn(5, 4, **DOUBLE, requires_grad=True)
    weight = torch.randn(3, 4, 3, **DOUBLE, requires_grad=True)
    assert gradcheck(lambda r, w: GroupedMatmul.apply(r, w, ends, counts, "auto"), (rows, weight))


class _SelectedExperts(ExpertLayer):
    """The multi-task experts' sparse path as a module's forward, for functional_call."""

    def forward(self, x_TD, routing_map_TE):
        return self.forward_selected(x_TD, routing_map_TE)


def test_multitask_selected_experts_gradcheck():
    # The multi-task experts run only the selected (sample, expert) pairs through GroupedMatmul;
    # expert 1 is selected by no sample.
    torch.manual_seed(1)
    layer = _SelectedExperts(num_experts=3, d_in=4, d_hidden=2).double()
    routing_map_TE = torch.tensor([[True, False, True], [False, False, True], [True, False, False]])
    x = torch.randn(3, 4, **DOUBLE, requires_grad=True)
    w_in = layer.w_in.detach().clone().requires_grad_(True)
    b_in = layer.b_in.detach().clone().requires_grad_(True)

    def selected(x_TD, w_in_EDH, b_in_EH):
        params = {"w_in": w_in_EDH, "b_in": b_in_EH}
        return torch.func.functional_call(layer, params, (x_TD, routing_map_TE))

    assert gradcheck(selected, (x, w_in, b_in))


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_experts_up_gradcheck(activation):
    torch.manual_seed(2)
    plan = _plan()
    width = 4 if activation == "swiglu" else 2
    x = torch.randn(3, 3, **DOUBLE, requires_grad=True)
    w_in = torch.randn(3, 3, width, **DOUBLE, requires_grad=True)

    def up(x_TD, w_in_EDH):
        return _ExpertsUp.apply(
            x_TD, w_in_EDH, plan.token_of_row_N, plan.row_of_assignment_N, plan.bag_offsets_T,
            plan.group_ends_E, plan.tokens_per_expert, activation, "auto",
        )

    assert gradcheck(up, (x, w_in))


def test_experts_down_combine_gradcheck():
    torch.manual_seed(3)
    plan = _plan()
    act = torch.randn(6, 2, **DOUBLE, requires_grad=True)
    weight = torch.rand(6, **DOUBLE, requires_grad=True)
    w_out = torch.randn(3, 2, 3, **DOUBLE, requires_grad=True)

    def down(act_NF, weight_N, w_out_EFD):
        return _ExpertsDownCombine.apply(
            act_NF, weight_N, w_out_EFD, plan.token_of_row_N, plan.row_of_assignment_N, plan.order_N,
            plan.bag_offsets_T, plan.group_ends_E, plan.tokens_per_expert, "auto",
        )

    assert down(act, weight, w_out).dtype == torch.float64  # float64 experts combine in float64
    assert gradcheck(down, (act, weight, w_out))


def test_contiguous_grad_gradcheck_and_dense_gradient():
    x = torch.randn(3, 2, **DOUBLE, requires_grad=True)
    assert gradcheck(_ContiguousGrad.apply, (x,))
    seen = {}
    y = _ContiguousGrad.apply(x * 1.0)
    y.register_hook(lambda grad: seen.setdefault("upstream", grad))
    y.sum().backward()  # the upstream gradient of sum() is an expanded zero-stride tensor
    assert seen["upstream"].stride() == (0, 0)
    assert x.grad.is_contiguous() and x.grad.tolist() == [[1.0, 1.0]] * 3


def test_stamp_gradcheck_and_records_the_backward():
    stamps = {}
    meter = AllToAllMeter(seconds=1.5)
    x = torch.randn(4, **DOUBLE, requires_grad=True)
    assert gradcheck(lambda t: _Stamp.apply(t, stamps, "here", meter), (x,))
    assert stamps["here"][1] == 1.5  # (clock, all-to-all seconds so far) at the backward


@pytest.fixture
def one_process_group():
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_all_to_all_gradcheck_on_one_rank(one_process_group):
    # With one rank the all-to-all sends every row to itself: forward and backward are the
    # identity, which gradcheck confirms end to end through gloo. The reverse all-to-all of the
    # backward across ranks is checked against one process on 2 and 4 ranks in test_parallel.py.
    x = torch.randn(5, 3, **DOUBLE, requires_grad=True)
    assert gradcheck(lambda t: _AllToAll.apply(t, [5], [5], None), (x,))


def test_all_to_all_observer_sees_every_collective(one_process_group):
    seen = []
    previous = set_all_to_all_observer(lambda sent, seconds: seen.append((sent, seconds)))
    try:
        x = torch.randn(4, 3, requires_grad=True)
        all_to_all(x, [4], [4]).sum().backward()  # forward and backward: two collectives
    finally:
        assert set_all_to_all_observer(previous) is not None
    # One rank sends nothing to others: 0 bytes each time, a non-negative duration.
    assert [sent for sent, _ in seen] == [0, 0] and all(seconds >= 0 for _, seconds in seen)
    all_to_all(torch.randn(2, 3), [2], [2])
    assert len(seen) == 2  # uninstalled: no more calls
