"""The runtime on a GPU: compiled Triton kernels and the CUDA transfer engine (marker `cuda`)."""
import pytest
import torch

import hift_rt
from models import assert_params_close, batches, loss_of, merge_units, tiny_llama, train_side_by_side
from reference_hift import ReferenceHiFT

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("strategy", ["bottom_up", "top_down", "random"])
@pytest.mark.parametrize("units_per_group", [1, 3])
@pytest.mark.parametrize("offload", [True, False])
def test_cuda_matches_reference_loop(strategy, units_per_group, offload):
    ours, units = tiny_llama()
    ref, _ = tiny_llama()
    ours.cuda()
    ref.cuda()
    # eps=1e-3: see tests/test_runtime.py, run_pair (kernels and torch round differently in the
    # last bit; gradients that are pure rounding noise would amplify that with eps=1e-8).
    opt = hift_rt.wrap(ours, "adamw", lr=1e-2, strategy=strategy, units_per_group=units_per_group,
                       offload=offload, seed=5, eps=1e-3)
    assert opt.engine is not None if offload else opt.engine is None
    if offload:
        assert opt.engine.backend == "cuda"
    reference = ReferenceHiFT(ref, merge_units(units, units_per_group), torch.optim.AdamW, lr=1e-2,
                              strategy=strategy, seed=5, eps=1e-3)
    data = [b.cuda() for b in batches("llama", 3 * reference.k)]
    train_side_by_side("llama", [(ours, opt), (ref, reference)], data)
    assert_params_close(ours, ref)
    opt.close()


def _llama(hidden=512, layers=6, vocab=8000):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.config.use_cache = False
    return model


def _allocated():
    # cuBLAS keeps a workspace per (handle, stream) in the caching allocator from its first GEMM
    # on; torch's own leak checks drop them before counting, and so do we.
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    return torch.cuda.memory_allocated()


def test_cuda_memory_is_weights_plus_one_group_of_gradients_and_state():
    """Between steps the device holds the weights, one group's gradient buffer and the state
    slot, and nothing else of the runtime: the state of inactive groups is in host memory."""
    torch.cuda.empty_cache()
    base = _allocated()
    model = _llama()
    weights = _allocated() - base
    opt = hift_rt.wrap(model, "adamw", lr=1e-4, offload=True)
    mem = opt.memory_breakdown()
    x = torch.randint(0, 8000, (2, 256), device="cuda")
    for _ in range(len(opt.groups) + 2):
        loss_of("llama", model, x).backward()
        opt.step()
        opt.zero_grad()
    steady = _allocated() - base
    expected = mem["weights"] + mem["gradients"] + mem["state_device"]
    print(f"\nweights {weights / 2**20:.1f} MiB (flat {mem['weights'] / 2**20:.1f}), gradients "
          f"{mem['gradients'] / 2**20:.1f}, state slot {mem['state_device'] / 2**20:.1f}, host state "
          f"{mem['state_host'] / 2**20:.1f} MiB; allocated between steps {steady / 2**20:.1f} MiB")
    # 5%, plus 2 MiB for the allocator's rounding (blocks round up to 512 B, large ones taken
    # whole from a cached segment) and small buffers of the model (rotary tables).
    assert abs(steady - expected) <= 0.05 * expected + 2 * 2**20
    assert mem["state_device"] < mem["state_host"] / 2

    # The update itself allocates no group-sized temporaries.
    loss_of("llama", model, x).backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 0.01 * steady
    opt.close()


def test_cuda_step_does_not_synchronize_the_host():
    model = _llama(hidden=256, layers=4)
    opt = hift_rt.wrap(model, "adamw", lr=1e-4, offload=True, max_grad_norm=1.0)
    x = torch.randint(0, 8000, (2, 64), device="cuda")
    for _ in range(len(opt.groups)):  # warm up: every kernel variant compiled, every buffer allocated
        loss_of("llama", model, x).backward()
        opt.step()
        opt.zero_grad()
    for _ in range(2 * len(opt.groups)):
        loss_of("llama", model, x).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    opt.close()


def test_cuda_bf16_master_weights_round_to_nearest():
    model = _llama(hidden=128, layers=2, vocab=512)
    opt = hift_rt.wrap(model, "adamw", lr=1e-3, offload=True)
    x = torch.randint(0, 512, (2, 32), device="cuda")
    for _ in range(2 * len(opt.groups)):
        loss_of("llama", model, x).backward()
        opt.step()
        opt.zero_grad()
    params = opt.param_groups[0]["params"]
    for i, entry in opt.state_dict()["state"].items():
        assert torch.equal(params[i].detach().cpu(), entry["master"].to(torch.bfloat16).cpu())
    opt.close()


def test_cuda_wrap_reserves_no_more_than_training_plus_one_group():
    """wrap re-homes group by group and builds the initial state in host memory: the memory it
    reserves stays within what training holds (weights, gradient buffer, state slot) plus one
    group's old parameters."""
    torch.cuda.empty_cache()
    model = _llama(hidden=512, layers=8)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_reserved()
    opt = hift_rt.wrap(model, "adamw", lr=1e-4, offload=True, state_window=None)
    torch.cuda.synchronize()
    mem = opt.memory_breakdown()
    largest_group = max(g["buffer_numel"] for g in opt.describe_groups()) * 2
    training = mem["gradients"] + mem["state_device"]  # the weights are in `base`
    peak = torch.cuda.max_memory_reserved() - base
    print(f"\nwrap reserved {peak / 2**20:.1f} MiB over the model's; training holds {training / 2**20:.1f} MiB "
          f"more, a group's weights are {largest_group / 2**20:.1f} MiB")
    assert peak <= training + largest_group + 8 * 2**20  # + the allocator's rounding to 2 MiB segments
    opt.close()
