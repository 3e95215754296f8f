"""Real architectures end to end: discovery finds the groups read off the architecture, and balance_, prox_(tau=0)
and compact keep the function (tests/zoo.py builds the models; nothing downloads)."""

import copy

import pytest
import torch
from zoo import CNNS, TRANSFORMERS, ZOO, Case, call

import lightning_bv as lbv

transformers = pytest.importorskip("transformers")
CASES = [pytest.param(c, id=c.name) for c in ZOO]


def build(case: Case):
    torch.manual_seed(0)
    model = case.make().eval()
    example = case.example()
    if not case.hf:  # non-trivial running statistics, so that eval-mode BatchNorm is not the identity
        model.train()
        with torch.no_grad():
            for _ in range(2):
                call(model, 2 * torch.randn_like(example) + 0.5)
        model.eval()
    return model, example


def assert_close(model, reference, example, rtol=1e-5):
    with torch.no_grad():
        y, ref = call(model, example), call(reference, example)
    scale = ref.abs().max().item()
    assert (y - ref).abs().max().item() <= rtol * scale, ((y - ref).abs().max().item(), scale)


def kill(groups, every=4):
    """Zero the output weights of neurons 1, 1 + every, ... of every group (the same channels in each group)."""
    for g in groups:
        factor = torch.ones(g.num_neurons)
        factor[1::every] = 0.0
        for s in g.v_slots:
            s.scale_(factor)


@pytest.mark.parametrize("case", CASES)
def test_discovery_finds_the_groups_of_the_architecture(case):
    model, example = build(case)
    groups = lbv.find_neurons(model, example)
    found = sorted((g.name, g.norm, g.consumers, g.num_neurons) for g in groups)
    assert found == sorted(case.groups)
    assert len(groups.skipped) == case.skipped, groups.skipped


@pytest.mark.parametrize("case", CASES)
def test_balance_and_prox_zero_keep_the_function(case):
    model, example = build(case)
    reference = copy.deepcopy(model)
    groups = lbv.find_neurons(model, example)
    with torch.no_grad():  # unbalanced on purpose: scale every group's input side by 3
        for g in groups:
            for s in g.w_slots + g.b_slots:
                s.scale_(torch.full((g.num_neurons,), 3.0))
            for s in g.v_slots:
                s.scale_(torch.full((g.num_neurons,), 1 / 3))
    assert_close(model, reference, example)
    lbv.balance_(groups)
    assert_close(model, reference, example)
    lbv.prox_(groups, 0.0)
    assert_close(model, reference, example)


@pytest.mark.parametrize("case", CASES)
def test_compact_removes_dead_neurons_and_keeps_the_function(case):
    model, example = build(case)
    groups = lbv.find_neurons(model, example)
    kill(groups)
    reference = copy.deepcopy(model)
    report = lbv.compact(model, groups)
    groups = report.neuron_groups  # new groups for the compacted model
    assert report.params_after < report.params_before
    assert_close(model, reference, example)
    rows = {r.name: r for r in report.groups}
    for name, row in rows.items():
        if name in case.cannot_shrink:
            assert not row.shrunk, (name, row)
            assert row.note.startswith("left whole: "), (name, row)
        else:
            assert row.after < row.before, (name, row)
    # the new groups are the ones discovery finds on the compacted model
    again = lbv.find_neurons(model, example)
    assert [(g.name, g.num_neurons) for g in again] == [(g.name, g.num_neurons) for g in groups]
    for a, b in zip(groups, again):
        for sa, sb in zip(a.slots(), b.slots()):
            assert (sa.module_name, sa.param, sa.dim, sa.index is None) == (
                sb.module_name,
                sb.param,
                sb.dim,
                sb.index is None,
            )
    # and they still work: balance_ keeps the compacted function
    lbv.balance_(groups)
    assert_close(model, reference, example)


@pytest.mark.parametrize("case", CASES)
def test_compacted_state_dict_loads_into_a_freshly_built_model(case):
    model, example = build(case)
    groups = lbv.find_neurons(model, example)
    kill(groups, every=3)
    lbv.compact(model, groups)
    torch.manual_seed(1)
    fresh = case.make().eval()  # the original sizes (for HF: from the stale config)
    state = model.state_dict()
    resized = lbv.resize_to_state_dict_(fresh, state)
    assert resized
    fresh.load_state_dict(state)
    assert_close(fresh, model, example, rtol=0.0)
    grouped = [(n, m.groups) for n, m in fresh.named_modules() if getattr(m, "groups", 1) != 1]
    assert grouped == [(n, m.groups) for n, m in model.named_modules() if getattr(m, "groups", 1) != 1]


def test_zoo_lists():
    assert {c.name for c in CNNS} >= {"resnet", "vgg_bn", "squeezenet", "densenet", "inception", "mnasnet", "regnet"}
    assert {c.name for c in TRANSFORMERS} == {"hf_opt", "hf_gpt2_relu", "hf_bert_relu", "hf_t5"}


def test_gpt2_conv1d_neuron_k_owns_weight_column_k_of_c_fc_and_row_k_of_c_proj():
    from zoo import GPT2

    model, example = build(GPT2)
    g = lbv.find_neurons(model, example)["transformer.h.0.mlp.c_fc"]
    mlp = model.transformer.h[0].mlp
    assert [(s.module_name, s.param, s.dim) for s in g.slots()] == [
        ("transformer.h.0.mlp.c_fc", "weight", 1),
        ("transformer.h.0.mlp.c_fc", "bias", 0),
        ("transformer.h.0.mlp.c_proj", "weight", 0),
    ]
    w, v = lbv.group_norms(g)
    assert torch.allclose(w, mlp.c_fc.weight.detach().norm(dim=0))
    assert torch.allclose(v, mlp.c_proj.weight.detach().norm(dim=1))
