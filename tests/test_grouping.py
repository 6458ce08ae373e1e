"""Units and groups: the depth cut of a model."""
import pytest
import torch
from torch import nn

from hift_rt import grouping
from models import tiny_gpt2, tiny_llama


def unit_names(model):
    return [(u.name, [n for n, _ in u.params]) for u in grouping.build_units(model)]


def test_llama_units_input_blocks_output():
    model, _ = tiny_llama(layers=3)
    units = unit_names(model)
    assert [u[0] for u in units] == ["input", "model.layers.0", "model.layers.1", "model.layers.2", "output"]
    assert units[0][1] == ["model.embed_tokens.weight"]
    assert units[-1][1] == ["model.norm.weight", "lm_head.weight"]
    assert all(n.startswith("model.layers.1.") for n in units[2][1])


def test_gpt2_tied_head_is_counted_once_in_the_input_unit():
    model, _ = tiny_gpt2(layers=2)
    units = unit_names(model)
    assert units[0] == ("input", ["transformer.wte.weight", "transformer.wpe.weight"])
    assert units[-1] == ("output", ["transformer.ln_f.weight", "transformer.ln_f.bias"])
    assert sum(len(u[1]) for u in units) == len(list(model.parameters()))


def test_bert_encoder_layers_are_the_stack():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    units = unit_names(BertModel(cfg))
    assert [u[0] for u in units] == ["input", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "output"]
    assert all(n.startswith("embeddings.") for n in units[0][1])
    assert all(n.startswith("pooler.") for n in units[-1][1])


def test_sequential_gets_one_unit_per_child_with_parameters():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Dropout(), nn.Linear(3, 1))
    assert [u[0] for u in unit_names(model)] == ["0", "2", "4"]


def test_frozen_parameters_are_left_out_and_empty_units_dropped():
    model, _ = tiny_llama(layers=2)
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[1].mlp.requires_grad_(False)
    units = unit_names(model)
    assert units[0][0] == "model.layers.0"
    assert not any("mlp" in n for n in units[1][1])


def test_root_parameters_and_a_model_that_is_itself_the_stack():
    class WithRoot(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.body = nn.Linear(2, 2)

    assert unit_names(WithRoot()) == [("<root>", ["scale"]), ("body", ["body.weight", "body.bias"])]
    stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert [u[0] for u in unit_names(stack)] == ["0", "1", "2"]


def test_the_stack_is_the_largest_uniform_module_list():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.mixed = nn.ModuleList([nn.Linear(50, 50), nn.Conv1d(2, 2, 1)])
            self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    name, _ = grouping.find_block_stack(Model())
    assert name == "blocks"


@pytest.mark.parametrize("per_group,expected", [(1, 6), (2, 3), (4, 2), (6, 1), (100, 1)])
def test_groups_are_runs_of_units_bottom_to_top(per_group, expected):
    model, _ = tiny_llama(layers=4)
    groups = grouping.groups_from_units(grouping.build_units(model), per_group)
    assert len(groups) == expected
    flat = [n for g in groups for n, _ in g.params]
    assert flat == [n for n, _ in model.named_parameters()]
    assert groups[0].unit_names[0] == "input"
