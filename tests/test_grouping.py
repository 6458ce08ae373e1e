"""Units and groups: the depth cut of a model."""
import warnings

import pytest
import torch
from torch import nn

from hift_rt import grouping
from architectures import ARCHITECTURES, expected_units
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


@pytest.mark.parametrize("per_group,expected", [(1, 6), (2, 3), (4, 2), (6, 1), (100, 1)])
def test_groups_are_runs_of_units_bottom_to_top(per_group, expected):
    model, _ = tiny_llama(layers=4)
    groups = grouping.groups_from_units(grouping.build_units(model), per_group)
    assert len(groups) == expected
    flat = [n for g in groups for n, _ in g.params]
    assert flat == [n for n, _ in model.named_parameters()]
    assert groups[0].unit_names[0] == "input"


def test_root_parameters_and_a_model_that_is_itself_the_stack():
    class WithRoot(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.body = nn.Linear(2, 2)

    assert unit_names(WithRoot()) == [("scale", ["scale"]), ("body", ["body.weight", "body.bias"])]
    stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert [u[0] for u in unit_names(stack)] == ["0", "1", "2"]


# -- real architectures (meta device) ---------------------------------------------------------

def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_block_of_every_stack_is_a_unit_and_glue_sits_where_it_acts(arch):
    model, layout = ARCHITECTURES[arch]()
    units = grouping.build_units(model)
    assert [(u.prefixes, u.block) for u in units] == expected_units(model, layout)
    names = [n for u in units for n, _ in u.params]
    assert sorted(names) == sorted(trainable_names(model))  # each trainable parameter exactly once
    for u in units:
        assert all(any(n == pre or n.startswith(pre + ".") for pre in u.prefixes) for n, _ in u.params)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_no_group_is_oversized_unless_it_is_one_unit(arch):
    model, _ = ARCHITECTURES[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", grouping.GroupingWarning)
        groups = grouping.cut(model, units_per_group=1)
    total = sum(p.numel() for g in groups for _, p in g.params)
    limit = min(2 / len(groups), 0.75)
    for g in groups:
        size = sum(p.numel() for _, p in g.params)
        if size > limit * total:
            assert len(g.unit_names) == 1 and any("more than" in n for n in g.notes), (g.name, size / total)


def test_jamba_mixed_layers_are_each_a_unit():
    model, _ = ARCHITECTURES["jamba"]()
    blocks = [u.name for u in grouping.build_units(model) if u.block]
    assert blocks == [f"model.layers.{i}" for i in range(4)]
    assert len({type(model.model.layers[i]).__name__ for i in range(4)}) == 2


def test_a_parameter_used_inside_the_loop_over_a_stack_is_placed_after_it_with_a_note():
    model, _ = ARCHITECTURES["deberta_v2"]()
    groups = grouping.cut(model)
    assert groups[-1].unit_names == ["output"] and [n for n, _ in groups[-1].params][0].startswith("encoder.conv.")
    assert any("encoder.conv is first used inside the loop over encoder.layer" in n for n in groups[-1].notes)


def test_a_tied_parameter_is_noted_where_it_is_trained():
    model, _ = ARCHITECTURES["gpt2"]()
    units = grouping.build_units(model)
    assert "transformer.wte.weight is also lm_head.weight (tied)" in units[0].note
    assert grouping.groups_from_units(units, 1)[0].notes == [units[0].note]


# -- hand-made stacks ---------------------------------------------------------------------------

class Mamba(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.in_proj, self.A_log, self.out_proj = nn.Linear(dim, 2 * dim), nn.Parameter(torch.zeros(dim, 4)), nn.Linear(2 * dim, dim)


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)


def test_a_module_list_of_mixed_classes_is_a_stack():
    class Hybrid(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.layers = nn.ModuleList([Mamba(8), Mamba(8), Attention(8), Mamba(8), Attention(8)])
            self.norm = nn.LayerNorm(8)

    names = [u[0] for u in unit_names(Hybrid())]
    assert names == ["input", *[f"layers.{i}" for i in range(5)], "output"]


@pytest.mark.parametrize("build,expected", [
    (lambda blocks: nn.Sequential(nn.Linear(4, 16), nn.Sequential(*blocks), nn.LayerNorm(16), nn.Linear(16, 2)),
     ["0", "1.0", "1.1", "1.2", "1.3", "2", "3"]),
    (lambda blocks: nn.Sequential(nn.Sequential(*blocks)), ["0.0", "0.1", "0.2", "0.3"]),
    (lambda blocks: nn.Sequential(nn.Sequential(*blocks), nn.ReLU()), ["0.0", "0.1", "0.2", "0.3"]),
])
def test_blocks_in_nested_sequentials_are_units(build, expected):
    from architectures import Block

    torch.manual_seed(0)
    assert [u[0] for u in unit_names(build([Block(16) for _ in range(4)]))] == expected


def test_a_wrapper_holding_one_sequential_is_looked_through():
    from architectures import Block

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*[Block(8) for _ in range(3)])

    assert [u[0] for u in unit_names(Net())] == ["net.0", "net.1", "net.2"]


class Ordered(nn.Module):
    """Registration order is not dataflow order: final_norm is registered first, embed_norm after
    the blocks, `mix` is used inside the loop, and a side-effect call mentions the blocks first."""

    def __init__(self):
        super().__init__()
        self.final_norm = nn.LayerNorm(8)
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.embed_norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def _check_blocks(self):
        assert all(b.in_features == 8 for b in self.blocks)

    def _embedded(self, ids):
        return self.embed_norm(self.embed(ids))

    def forward(self, ids):
        self._check_blocks()
        x = self._embedded(ids)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0:
                x = self.mix(x)
        return self.head(self.final_norm(x))


def test_units_follow_the_forward_not_the_registration_order():
    units = grouping.build_units(Ordered())
    assert [u.prefixes for u in units] == [["embed", "embed_norm"], ["blocks.0"], ["blocks.1"], ["blocks.2"],
                                           ["mix", "final_norm", "head"]]
    assert units[-1].note == "mix is first used inside the loop over blocks, between its blocks, so it is placed after them"
    model = Ordered()
    model(torch.tensor([[1, 2]]))  # the forward the order was read from runs


def test_without_readable_source_units_follow_registration_order():
    namespace = {"nn": nn}
    exec("class NoSource(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.final_norm = nn.LayerNorm(4)\n"
         "        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])\n"
         "        self.embed = nn.Embedding(5, 4)\n"
         "    def forward(self, ids):\n"
         "        return self.final_norm(self.blocks[1](self.blocks[0](self.embed(ids))))\n", namespace)
    units = grouping.build_units(namespace["NoSource"]())
    assert [u.prefixes for u in units] == [["final_norm"], ["blocks.0"], ["blocks.1"], ["embed"]]


def test_an_oversized_stage_is_cut_into_its_blocks():
    class Stage(nn.Module):
        def __init__(self, dim, depth):
            super().__init__()
            self.downsample = nn.Linear(dim // 2, dim)
            self.blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(depth)])

    class Hierarchical(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(3, 4)
            self.stages = nn.ModuleList([Stage(8, 2), Stage(16, 2), Stage(64, 4)])

    units = [u[0] for u in unit_names(Hierarchical())]
    assert units == ["input", "stages.0", "stages.1", "stages.2.downsample",
                     "stages.2.blocks.0", "stages.2.blocks.1", "stages.2.blocks.2", "stages.2.blocks.3"]


def test_weight_norm_parametrizations_are_not_a_stack():
    model = nn.Sequential(nn.Linear(4, 4), nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
    units = grouping.build_units(model)
    assert [u.name for u in units] == ["0", "1"]
    assert sorted(n for n, _ in units[1].params) == ["1.bias", "1.parametrizations.weight.original0",
                                                     "1.parametrizations.weight.original1"]


# -- balance warnings ---------------------------------------------------------------------------

def cut_warnings(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = grouping.cut(model, **kwargs)
    return groups, [str(w.message) for w in caught if issubclass(w.category, grouping.GroupingWarning)]


def test_one_group_for_a_model_with_blocks_warns_and_shows_groups():
    model, _ = tiny_llama(layers=4)
    groups, caught = cut_warnings(model, units_per_group=100)
    assert len(groups) == 1 and len(caught) == 1
    assert "1 group of 6 unit(s)" in caught[0] and "plain full fine-tuning" in caught[0]
    assert "groups=[['model.embed_tokens'], ['model.layers.0'], ..., ['model.norm', 'lm_head']]" in caught[0]
    groups = grouping.cut(model, groups=[["model.embed_tokens"], ["model.layers.0"], ["model.layers.1", "model.layers.2",
                                                                                   "model.layers.3", "model.norm", "lm_head"]])
    assert [len(g.params) for g in groups] == [1, 9, 29]


def test_a_group_of_several_units_over_twice_its_share_warns():
    model, _ = tiny_llama(layers=4)
    groups, caught = cut_warnings(model, units_per_group=5)
    assert len(groups) == 2 and len(caught) == 1
    assert "group 0 (input..model.layers.3) holds 9" in caught[0] and "smaller units_per_group" in caught[0]
    assert cut_warnings(model, units_per_group=2)[1] == []


def test_a_model_whose_blocks_the_cut_cannot_see_warns():
    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1, self.block2, self.block3 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            return self.block3(self.block2(self.block1(x)))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = Backbone(), nn.Linear(32, 2)

    groups, caught = cut_warnings(Model())
    assert [g.name for g in groups] == ["backbone", "head"]
    assert len(caught) == 1 and "group 0 (backbone) holds 98%" in caught[0] and "no finer structure" in caught[0]
    assert "groups=[['backbone'], ['head']]" in caught[0]


def test_an_unavoidably_large_unit_is_noted_not_warned():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=5000, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    groups, caught = cut_warnings(model)
    assert caught == []
    assert groups[0].notes[-1].startswith("holds 9") and "transformer.wte.weight is" in groups[0].notes[-1]
    groups, caught = cut_warnings(nn.Linear(100, 100))
    assert caught == [] and [g.name for g in groups] == ["weight", "bias"]
    assert "because weight is 100% of its one unit and no cut splits a parameter" in groups[0].notes[0]


def test_an_oversized_block_is_noted_not_warned():
    from architectures import Block

    groups, caught = cut_warnings(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), Block(64)))
    assert caught == [] and groups[2].notes == ["holds 100% of the trainable parameters, more than 67%: it is one "
                                                "block, which the automatic cut does not split (groups= can, by parameter name)"]


def test_explicit_groups_are_not_checked_for_balance():
    model, _ = tiny_llama(layers=4)
    groups, caught = cut_warnings(model, groups=[["model.embed_tokens"], ["model.layers", "model.norm", "lm_head"]])
    assert len(groups) == 2 and caught == []


def test_bad_units_per_group_is_refused():
    model, _ = tiny_llama(layers=2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="units_per_group must be a positive int"):
            grouping.cut(model, units_per_group=bad)
