"""The LM head's loss without full logits: hift_rt.kernels.linear_cross_entropy against its float64
reference, and hift_rt.efficient_lm_loss against the models' own loss.

Kernel checks run on each target, as tests/test_kernels.py: "interpreter" (the Triton row kernel in
Triton's interpreter, when conftest set TRITON_INTERPRET=1; kept to a few small cases, it is
slow), "torch" (the torch path) and "cuda" (skipped without a GPU). The (N, V) logits are shown
never to exist by recording the shape of every tensor an aten op returns (a TorchDispatchMode),
forward and backward. Model checks use tiny Llama and GPT-2 (tied head) models, mostly on the
torch path.
"""
import copy
import importlib
import inspect
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hift_rt
from hift_rt import methods
from hift_rt.job import options, train
from hift_rt.kernels import _common, linear_cross_entropy, linear_cross_entropy_ref
from models import assert_params_close, tiny_gpt2, tiny_llama, train_side_by_side
from sm90 import compile_for_sm90

lce = importlib.import_module("hift_rt.kernels.linear_cross_entropy")

N, H, V, CHUNK, BLOCK_V = 13, 24, 300, 5, 128  # 3 chunks (5, 5, 3), 3 column blocks (128, 128, 44)
# |loss - reference| and max |grad - reference| / max |reference| (bf16/fp16: the logits are
# rounded to the inputs' dtype, as a model's own head rounds them, before any fp32 math)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.fixture(params=["interpreter", "torch", pytest.param("cuda", marks=pytest.mark.cuda)])
def target(request, monkeypatch):
    """The device and path the kernel checks run on; the column block is made small (BLOCK_V)
    so that a row takes several blocks, the last one partial."""
    monkeypatch.setattr(lce, "BLOCK_V", BLOCK_V)
    if request.param == "cuda":
        return torch.device("cuda")
    if request.param == "interpreter" and not _common.TRITON_ON_CPU:
        pytest.skip("TRITON_INTERPRET=1 was not set before hift_rt.kernels was imported")
    monkeypatch.setattr(_common, "TRITON_ON_CPU", request.param == "interpreter")
    return torch.device("cpu")


@pytest.fixture
def torch_path(monkeypatch):
    """CPU tensors take the torch path (the model-level checks: many rows, the interpreter is slow)."""
    monkeypatch.setattr(_common, "TRITON_ON_CPU", False)


def make_inputs(dtype, device, bias=True, seed=0, n=N, v=V, ignore=(2, 5)):
    """hidden (n, H), weight (v, H) scaled so logits are O(1)-O(5), bias, labels with `ignore` rows -100."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen)
    weight = torch.randn(v, H, generator=gen) * (2 / math.sqrt(H))
    b = torch.randn(v, generator=gen) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[list(ignore)] = -100
    def cast(t):
        return None if t is None else t.to(device, dtype).requires_grad_()

    return cast(hidden), cast(weight), cast(b), labels.to(device)


def assert_matches_reference(loss, hidden, weight, bias, labels, tol, **options):
    ref = linear_cross_entropy_ref(hidden, weight, labels, bias, **options)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref[0].item()) <= tol * max(1.0, abs(ref[0].item())), (loss.item(), ref[0].item())
    for name, tensor, expected in (("hidden", hidden, ref[1]), ("weight", weight, ref[2]), ("bias", bias, ref[3])):
        if tensor is None:
            continue
        assert tensor.grad is not None and tensor.grad.dtype == tensor.dtype, name
        error = (tensor.grad.double().cpu() - expected.cpu()).abs().max().item()
        assert error <= tol * expected.abs().max().item(), (name, error, expected.abs().max().item())


class ShapeRecorder(TorchDispatchMode):
    """Records the shape and bytes of every tensor an aten op returns (allocations, views, out=
    buffers; the interpreter's byte views of a kernel's buffers)."""

    def __init__(self):
        super().__init__()
        self.shapes, self.nbytes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.shapes += [(str(func), tuple(t.shape)) for t in tensors]
        self.nbytes += [t.numel() * t.element_size() for t in tensors]
        return out

    def outputs_of(self, *names):
        return [shape for func, shape in self.shapes if any(name in func for name in names)]


# ---- the kernel against its float64 reference -------------------------------------------------

# (dtype, bias, ignore_index, num_items_in_batch)
CASES = [
    (torch.float32, True, -100, None),
    (torch.bfloat16, False, -100, 7),
    (torch.float32, False, 7, torch.tensor(20)),
    (torch.float16, True, -100, None),
    (torch.bfloat16, True, -100, torch.tensor([9.0])),
]
INTERPRETER_CASES = 2  # the interpreter is slow: it runs the first two (fp32 and bf16)
TARGET_CASES = [(t, c) for t in ("interpreter", "torch", "cuda") for c in range(len(CASES))
                if t != "interpreter" or c < INTERPRETER_CASES]


@pytest.mark.parametrize(
    "target, case", [pytest.param(t, c, marks=[pytest.mark.cuda] if t == "cuda" else []) for t, c in TARGET_CASES],
    indirect=["target"], ids=[f"{t}-" + "-".join(map(str, CASES[c])).replace("torch.", "") for t, c in TARGET_CASES])
def test_loss_and_gradients_match_the_float64_reference(target, case):
    dtype, bias, ignore_index, num_items = CASES[case]
    hidden, weight, b, labels = make_inputs(dtype, target, bias)
    if ignore_index != -100:  # a real class id as ignore_index: those labels count for nothing
        labels[labels == -100] = ignore_index
        labels[0] = ignore_index
    loss = linear_cross_entropy(hidden, weight, labels, b, ignore_index=ignore_index,
                                num_items_in_batch=num_items, chunk_size=CHUNK)
    loss.backward()
    assert_matches_reference(loss, hidden, weight, b, labels, TOLERANCE[dtype], ignore_index=ignore_index,
                             num_items_in_batch=num_items)


def test_every_chunk_size_gives_the_same_result(torch_path):
    results = []
    for chunk in (1, 4, N, 1000, None):
        hidden, weight, b, labels = make_inputs(torch.float32, "cpu")
        loss = linear_cross_entropy(hidden, weight, labels, b, chunk_size=chunk)
        loss.backward()
        results.append([loss, hidden.grad, weight.grad, b.grad])
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_chunk_rule_bounds_the_logits_chunk():
    assert lce.chunk_rows(2048, 128256, 2) == 1046 and lce.chunk_rows(4096, 32000, 2) == 4096
    assert lce.chunk_rows(10, 300, 4) == 10 and lce.chunk_rows(10, 2 ** 40, 4) == 1
    for n, v, size in ((2048, 128256, 2), (5000, 32000, 4), (100, 2 ** 30, 2)):
        assert lce.chunk_rows(n, v, size) * v * size <= max(lce.CHUNK_BYTES, v * size)


def test_backward_scales_by_the_incoming_gradient(target):
    hidden, weight, b, labels = make_inputs(torch.float32, target)
    (linear_cross_entropy(hidden, weight, labels, b, chunk_size=CHUNK) * 2.5).backward()
    ref = linear_cross_entropy_ref(hidden, weight, labels, b)
    for tensor, expected in zip((hidden, weight, b), ref[1:]):
        torch.testing.assert_close(tensor.grad.double().cpu(), 2.5 * expected.cpu(), rtol=1e-5, atol=1e-7)


def test_only_inputs_that_need_a_gradient_get_one_and_a_frozen_head_skips_its_matmul(torch_path):
    hidden, weight, b, labels = make_inputs(torch.float32, "cpu")
    ref = linear_cross_entropy_ref(hidden, weight, labels, b)
    # frozen head (HiFT's usual step): no (V, H) gradient is computed or allocated
    hidden, weight, b, labels = make_inputs(torch.float32, "cpu")
    weight.requires_grad_(False)
    b.requires_grad_(False)
    with ShapeRecorder() as rec:
        linear_cross_entropy(hidden, weight, labels, b, chunk_size=CHUNK).backward()
    assert (V, H) not in [shape for _, shape in rec.shapes] and weight.grad is None and b.grad is None
    torch.testing.assert_close(hidden.grad.double(), ref[1], rtol=1e-5, atol=1e-7)
    # a frozen lower stack: hidden needs no gradient, no (C, H) matmul runs
    hidden, weight, b, labels = make_inputs(torch.float32, "cpu")
    hidden.requires_grad_(False)
    with ShapeRecorder() as rec:
        linear_cross_entropy(hidden, weight, labels, b, chunk_size=CHUNK).backward()
    assert all(shape[1] == V for shape in rec.outputs_of("aten.mm", "aten.addmm") if shape != (V, H))
    assert hidden.grad is None
    torch.testing.assert_close(weight.grad.double(), ref[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.grad.double(), ref[3], rtol=1e-5, atol=1e-7)
    # no grad mode: only the logits' matmuls
    hidden, weight, b, labels = make_inputs(torch.float32, "cpu")
    with torch.no_grad(), ShapeRecorder() as rec:
        loss = linear_cross_entropy(hidden, weight, labels, b, chunk_size=CHUNK)
    assert rec.outputs_of("aten.mm", "aten.addmm") == [(5, V), (5, V), (3, V)]
    assert abs(loss.item() - ref[0].item()) < 1e-5 and loss.grad_fn is None


@pytest.mark.parametrize("path", ["torch", "interpreter"])
def test_no_tensor_of_n_by_v_is_ever_allocated(monkeypatch, path):
    if path == "interpreter" and not _common.TRITON_ON_CPU:
        pytest.skip("TRITON_INTERPRET=1 was not set before hift_rt.kernels was imported")
    monkeypatch.setattr(_common, "TRITON_ON_CPU", path == "interpreter")
    n, v, chunk = 40, 500, 16
    hidden, weight, b, labels = make_inputs(torch.float32, "cpu", n=n, v=v)
    with ShapeRecorder() as rec:
        linear_cross_entropy(hidden, weight, labels, b, chunk_size=chunk).backward()
    assert (chunk, v) in [shape for _, shape in rec.shapes]  # the chunk of logits: the recorder sees it
    assert max(rec.nbytes) == v * H * 4 < n * v * 4  # the largest is the weight's gradient
    # the recorder sees the (N, V) logits of the plain computation
    hidden, weight, b, labels = make_inputs(torch.float32, "cpu", n=n, v=v)
    with ShapeRecorder() as rec:
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, b), labels).backward()
    assert (n, v) in [shape for _, shape in rec.shapes]


def test_a_second_backward_through_the_same_loss_is_refused(torch_path):
    hidden, weight, b, labels = make_inputs(torch.float32, "cpu")
    loss = linear_cross_entropy(hidden, weight, labels, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_all_labels_ignored_gives_nan_loss_and_zero_gradients_as_torch(target):
    hidden, weight, b, labels = make_inputs(torch.float32, target)
    labels.fill_(-100)
    loss = linear_cross_entropy(hidden, weight, labels, b, chunk_size=CHUNK)
    loss.backward()
    assert math.isnan(loss.item())
    expected = hidden.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(expected, weight.detach(), b.detach()),
                                      labels).backward()
    assert torch.equal(hidden.grad, expected.grad) and not hidden.grad.any()
    assert not weight.grad.any() and not b.grad.any()


def test_under_autocast_the_head_runs_in_the_autocast_dtype_as_linear_does(torch_path):
    hidden, weight, b, labels = make_inputs(torch.float32, "cpu")
    copies = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, b, chunk_size=CHUNK)
        logits = torch.nn.functional.linear(*copies)
    expected = torch.nn.functional.cross_entropy(logits.float(), labels)
    assert logits.dtype == torch.bfloat16
    (loss + 0).backward()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-4 * abs(expected.item())
    for tensor, copy in zip((hidden, weight, b), copies):
        assert tensor.grad.dtype == torch.float32
        error = (tensor.grad - copy.grad).abs().max().item()
        assert error <= 1e-2 * copy.grad.abs().max().item()  # one more bf16 rounding of G than linear's


def test_gradient_checkpointing_recomputes_the_same_gradients(torch_path):
    results = []
    for checkpointed in (False, True):
        hidden, weight, b, labels = make_inputs(torch.float32, "cpu")

        def loss_of(h):
            return linear_cross_entropy(torch.tanh(h), weight, labels, b, chunk_size=CHUNK)

        loss = torch.utils.checkpoint.checkpoint(loss_of, hidden, use_reentrant=False) if checkpointed else loss_of(hidden)
        loss.backward()
        results.append((loss, hidden.grad, weight.grad))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


BAD_INPUTS = [
    (lambda h, w, y, b: dict(hidden=h[0]), ValueError, "must be 2-D"),
    (lambda h, w, y, b: dict(weight=w[:, :5]), ValueError, "features"),
    (lambda h, w, y, b: dict(labels=y[:4]), ValueError, "labels: expected shape"),
    (lambda h, w, y, b: dict(labels=y.float()), TypeError, "integer"),
    (lambda h, w, y, b: dict(labels=torch.where(y == 3, V, y).index_fill(0, torch.tensor([4]), V)), ValueError,
     "outside"),
    (lambda h, w, y, b: dict(labels=y.index_fill(0, torch.tensor([4]), -3)), ValueError, "outside"),
    (lambda h, w, y, b: dict(bias=b[:7]), ValueError, "bias: expected shape"),
    (lambda h, w, y, b: dict(weight=w.double()), TypeError, "not supported"),
    (lambda h, w, y, b: dict(weight=w.bfloat16()), TypeError, "differs from hidden"),
    (lambda h, w, y, b: dict(weight=w[:0]), ValueError, "empty"),
    (lambda h, w, y, b: dict(hidden=h.tolist()), TypeError, "hidden: expected a torch.Tensor"),
    (lambda h, w, y, b: dict(chunk_size=0), ValueError, "chunk_size"),
    (lambda h, w, y, b: dict(chunk_size=2.0), ValueError, "chunk_size"),
    (lambda h, w, y, b: dict(num_items_in_batch=0), ValueError, "num_items_in_batch: must be > 0"),
    (lambda h, w, y, b: dict(num_items_in_batch=True), TypeError, "num_items_in_batch"),
    (lambda h, w, y, b: dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_is_refused_with_a_clear_error(torch_path, case):
    change, error, message = BAD_INPUTS[case]
    hidden, weight, b, labels = make_inputs(torch.float32, "cpu")
    arguments = dict(hidden=hidden, weight=weight, labels=labels, bias=b)
    arguments.update(change(hidden.detach(), weight.detach(), labels, b.detach()))
    with pytest.raises(error, match=message):
        linear_cross_entropy(**arguments)


# Runs under tests/sm90.py's stand-in sm_90 driver; prints each variant's global accesses.
COMPILE_FOR_SM90 = r"""
import importlib
lce = importlib.import_module("hift_rt.kernels.linear_cross_entropy")
rows, v = 4, 128256
variants = [(torch.float32, True), (torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)]
for dtype, grad in variants:
    lce._launch_rows(torch.zeros(rows, v, dtype=dtype), torch.zeros(rows, dtype=torch.long), torch.zeros(rows),
                     -100, grad)
print(json.dumps([{"grad": grad, **accesses(kernel)} for (dtype, grad), (_, kernel) in zip(variants, compiled)]))
"""


def test_row_kernel_compiles_for_sm90_with_128_bit_row_accesses():
    """Every dtype compiles for an H100/H200 (sm_90); with V divisible by 16 (Llama-3's 128256)
    every access to a row of logits is 128 bits wide; the others are the label (64-bit), the
    label's logit and the row's loss."""
    variants = compile_for_sm90(COMPILE_FOR_SM90)
    assert len(variants) == 4
    for variant in variants:
        narrow_loads = [op for op in variant["loads"] if ".v4." not in op]
        narrow_stores = [op for op in variant["stores"] if ".v4." not in op]
        assert narrow_loads[0] == "ld.global.b64" and len(narrow_loads) == 2, variant  # label, its logit
        assert narrow_stores == ["st.global.b32"] * 2, variant  # the loss (ignored row, counted row)
        assert any(".v4." in op for op in variant["loads"]), variant
        assert any(".v4." in op for op in variant["stores"]) == variant["grad"], variant


@pytest.mark.cuda
def test_cuda_label_outside_the_vocabulary_gives_a_nan_loss_without_a_host_sync():
    hidden, weight, b, labels = make_inputs(torch.float32, "cuda")
    labels[3] = V
    assert math.isnan(linear_cross_entropy(hidden, weight, labels, b).item())


@pytest.mark.cuda
def test_cuda_peak_memory_follows_the_docstring_formula():
    n, h, v, chunk, dtype = 1024, 512, 32000, 256, torch.bfloat16
    hidden = torch.randn(n, h, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda", dtype=dtype) / 20).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    linear_cross_entropy(hidden, weight, labels, chunk_size=chunk).backward()  # cuBLAS workspaces, Triton
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, labels, chunk_size=chunk).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    formula = chunk * v * 2 + n * 4 + n * h * 2 + v * h * 2
    assert extra <= formula + 2 ** 20, (extra, formula)
    full = n * v * (2 + 4 + 4)  # what the model's own loss keeps: logits, fp32 copy, fp32 log-softmax
    assert extra < full / 4


# ---- efficient_lm_loss on Hugging Face models ---------------------------------------------------

def llama(vocab=301, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    return model


def batch(vocab=301, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    return ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, expected, tol):
    assert got.keys() == expected.keys()
    for name in expected:
        error = (got[name].float() - expected[name].float()).abs().max().item()
        assert error <= tol * expected[name].float().abs().max().item() + 1e-12, (name, error)


# dtype: (loss relative tolerance, gradient tolerance relative to each gradient's largest entry)
MODEL_TOLERANCE = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2e-3, 3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["torch", "interpreter"])
def test_llama_loss_and_gradients_match_the_models_own(monkeypatch, dtype, path):
    if path == "interpreter" and not _common.TRITON_ON_CPU:
        pytest.skip("TRITON_INTERPRET=1 was not set before hift_rt.kernels was imported")
    monkeypatch.setattr(_common, "TRITON_ON_CPU", path == "interpreter")
    monkeypatch.setattr(lce, "BLOCK_V", BLOCK_V)
    model = llama(dtype=dtype)
    ids, labels = batch()
    own, own_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    handle = hift_rt.efficient_lm_loss(model, chunk_size=7)  # 18 positions: chunks of 7, 7, 4
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    loss_tol, grad_tol = MODEL_TOLERANCE[dtype]
    assert out.logits is None and out.loss.dtype == torch.float32
    assert abs(out.loss.item() - own.loss.item()) <= loss_tol * own.loss.item()
    assert_grads_close(grads, own_grads, grad_tol)
    handle.remove()


def test_gpt2_tied_head_gradient_lands_on_the_shared_embedding(torch_path):
    model, _ = tiny_gpt2()
    ids, labels = batch(vocab=64)
    own, own_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    hift_rt.efficient_lm_loss(model, chunk_size=5)
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert out.logits is None and model.lm_head.weight is model.transformer.wte.weight
    assert abs(out.loss.item() - own.loss.item()) <= 1e-6 * own.loss.item()
    assert_grads_close(grads, own_grads, 1e-5)


def test_num_items_in_batch_and_shift_labels_are_honoured(torch_path):
    model = llama()
    ids, labels = batch()
    shift = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(3))
    shift[1, 4:] = -100
    cases = [dict(labels=labels, num_items_in_batch=11), dict(labels=labels, num_items_in_batch=torch.tensor(11)),
             dict(labels=labels, shift_labels=shift)]
    own = [loss_and_grads(model, input_ids=ids, **case) for case in cases]
    hift_rt.efficient_lm_loss(model)
    for case, (own_out, own_grads) in zip(cases, own):
        out, grads = loss_and_grads(model, input_ids=ids, **case)
        assert abs(out.loss.item() - own_out.loss.item()) <= 1e-6 * own_out.loss.item()
        assert_grads_close(grads, own_grads, 1e-5)


def test_without_labels_nothing_changes_and_remove_gives_the_model_back(torch_path):
    model = llama()
    ids, labels = batch()
    logits = model(input_ids=ids).logits
    own_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    signature = inspect.signature(model.forward)
    handle = hift_rt.efficient_lm_loss(model)
    assert hift_rt.efficient_lm_loss(model) is handle and model.forward is handle
    assert inspect.signature(model.forward) == signature  # what Trainer inspects
    assert torch.equal(model(input_ids=ids).logits, logits)
    assert torch.equal(model(ids).logits, logits)  # positional input_ids, no labels
    out = model(ids, None, None, None, None, labels)  # labels by position
    assert out.logits is None and torch.allclose(out.loss, own_tuple[0])
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert len(as_tuple) == len(own_tuple) - 1 and torch.allclose(as_tuple[0], own_tuple[0])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, labels=labels).loss, own_tuple[0])
    with pytest.raises(ValueError, match="labels for"):  # a failing call leaves nothing armed
        model(input_ids=ids, labels=labels[:, :4])
    assert "forward" not in model.lm_head.__dict__ and "_loss_function" not in model.__dict__
    assert torch.equal(model(input_ids=ids).logits, logits)
    handle.remove()
    handle.remove()
    assert "forward" not in model.__dict__
    assert torch.equal(model(input_ids=ids, labels=labels).logits, logits)
    assert hift_rt.efficient_lm_loss(model) is not handle


def test_a_deep_copy_computes_its_own_loss(torch_path):
    model = llama()
    ids, labels = batch()
    hift_rt.efficient_lm_loss(model)
    clone = copy.deepcopy(model)
    assert clone.forward.model is clone
    with torch.no_grad():
        clone.lm_head.weight.mul_(2)
        efficient = clone(input_ids=ids, labels=labels)
        clone.forward.remove()
        own = clone(input_ids=ids, labels=labels)
        assert efficient.logits is None and abs(efficient.loss.item() - own.loss.item()) <= 1e-6 * own.loss.item()
        assert model(input_ids=ids, labels=labels).logits is None  # the original keeps its handle


def test_autocast_and_gradient_checkpointing(torch_path):
    model = llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own, own_grads = loss_and_grads(model, input_ids=ids, labels=labels)
        hift_rt.efficient_lm_loss(model, chunk_size=5)
        out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert out.logits is None and abs(out.loss.item() - own.loss.item()) <= 2e-3 * own.loss.item()
    assert_grads_close(grads, own_grads, 3e-2)
    assert all(g.dtype == torch.float32 for g in grads.values())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_wrapped_by_hift_matches_the_models_own_loss(torch_path, kind):
    """Every group of a full cycle and then some: the head frozen (hidden needs a gradient, the
    head's weight not) and active, the embedding active (tied in GPT-2: the head's gradient and the
    embedding's land on one parameter), parameters being views of flat buffers."""
    build = tiny_llama if kind == "llama" else tiny_gpt2
    models = [build()[0], build()[0]]
    hift_rt.efficient_lm_loss(models[1], chunk_size=5)
    # SGD: an update linear in the gradient (Adam would magnify fp32 noise in near-zero gradients)
    opts = [hift_rt.wrap(m, "sgd", lr=0.5, momentum=0.9, offload=False) for m in models]
    k = len(opts[0].describe_groups())
    data = [torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(k + 2)]
    train_side_by_side(kind, list(zip(models, opts)), data)
    assert_params_close(models[1], models[0], rtol=1e-4, atol=1e-6)
    for opt in opts:
        opt.close()


def llama_transforming_its_logits(transform):
    """A Llama whose forward applies `transform` to the logits before its loss."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class Model(LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = transform(self.lm_head(self.model(input_ids=input_ids).last_hidden_state))
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    return Model(llama().config)


@pytest.mark.parametrize("transform, error", [
    (lambda logits: logits * 2.0, TypeError),
    (lambda logits: torch.tanh(logits), TypeError),
    (lambda logits: logits.float(), AttributeError),
    (lambda logits: logits[..., :-1, :], TypeError),
], ids=["multiply", "torch-function", "method", "index"])
def test_a_model_that_uses_its_logits_before_the_loss_is_refused_at_the_call(torch_path, transform, error):
    model = llama_transforming_its_logits(transform)
    ids, labels = batch()
    hift_rt.efficient_lm_loss(model)
    with pytest.raises(error, match="uses its logits"):
        model(input_ids=ids, labels=labels)
    assert model(input_ids=ids).logits.shape[-1] == 301  # without labels: the model as before


class NotLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _custom_loss(model):
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()


def _soft_capping(model):
    model.config.final_logit_softcapping = 30.0


def _head_not_linear(model):
    model.lm_head = NotLinear(32, 301, bias=False)


def _head_hook(model):
    model.lm_head.register_forward_hook(lambda module, args, out: out)


def _no_head(model):
    model.lm_head = None


@pytest.mark.parametrize("change, message", [
    (_custom_loss, "not transformers' ForCausalLMLoss"),
    (_soft_capping, "final_logit_softcapping"),
    (_head_not_linear, "not a plain torch.nn.Linear"),
    (_head_hook, "forward hooks"),
    (_no_head, "no output embeddings"),
])
def test_what_it_cannot_compute_exactly_is_refused(change, message):
    model = llama()
    change(model)
    with pytest.raises(ValueError, match=message):
        hift_rt.efficient_lm_loss(model)
    with pytest.raises(ValueError, match=message):
        hift_rt.loss.check_supported(model)
    assert "forward" not in model.__dict__


def test_a_change_after_applying_is_refused_at_the_next_call_with_labels(torch_path):
    model = llama()
    ids, labels = batch()
    hift_rt.efficient_lm_loss(model)
    _custom_loss(model)
    with pytest.raises(ValueError, match="not transformers' ForCausalLMLoss"):
        model(input_ids=ids, labels=labels)
    assert model.loss_function(torch.ones(2), None, 301).item() == 2.0  # the user's loss stays in place


def test_a_forward_without_labels_is_refused():
    from transformers import LlamaForCausalLM

    class Model(LlamaForCausalLM):
        def forward(self, input_ids=None):
            return super().forward(input_ids=input_ids)

    with pytest.raises(ValueError, match="takes no labels"):
        hift_rt.efficient_lm_loss(Model(llama().config))


def test_refusals_of_the_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hift_rt.efficient_lm_loss("model")
    with pytest.raises(ValueError, match="no output embeddings"):
        hift_rt.efficient_lm_loss(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    model = llama()
    with pytest.raises(ValueError, match="chunk_size"):
        hift_rt.efficient_lm_loss(model, chunk_size=0)
    hift_rt.efficient_lm_loss(model, chunk_size=4)
    with pytest.raises(ValueError, match="already applied with chunk_size=4"):
        hift_rt.efficient_lm_loss(model, chunk_size=8)


def test_a_peft_model_is_served_through_its_base_model(torch_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, labels = batch()
    own, own_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    handle = hift_rt.efficient_lm_loss(model, chunk_size=5)
    assert handle.model is model.get_base_model()
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert out.logits is None and abs(out.loss.item() - own.loss.item()) <= 1e-6 * own.loss.item()
    assert_grads_close(grads, own_grads, 1e-5)


@pytest.mark.cuda
def test_cuda_bf16_llama_matches_the_models_own_loss():
    model = llama(dtype=torch.bfloat16).cuda()
    ids, labels = (t.cuda() for t in batch())
    own, own_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    hift_rt.efficient_lm_loss(model, chunk_size=7)
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert out.logits is None and abs(out.loss.item() - own.loss.item()) <= 2e-3 * own.loss.item()
    assert_grads_close(grads, own_grads, 3e-2)


def test_hf_trainer_with_gradient_accumulation_matches_the_models_own_loss(torch_path, tmp_path, monkeypatch):
    """HiFTTrainer passes num_items_in_batch (the kept labels of all accumulated micro-batches) to
    the model, which hands it to the efficient loss."""
    from transformers import TrainingArguments

    from hift_rt.integrations.transformers import HiFTTrainer

    divisors = []
    recorded = hift_rt.loss.linear_cross_entropy

    def recording(*args, **kwargs):
        divisors.append(kwargs["num_items_in_batch"])
        return recorded(*args, **kwargs)

    monkeypatch.setattr(hift_rt.loss, "linear_cross_entropy", recording)
    data = torch.randint(0, 64, (16, 10), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": torch.where(row < 8, -100, row)} for row in data]
    models = [tiny_llama()[0], tiny_llama()[0]]
    hift_rt.efficient_lm_loss(models[1], chunk_size=7)
    for i, model in enumerate(models):
        args = TrainingArguments(str(tmp_path / str(i)), max_steps=4, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-2, save_strategy="no",
                                 report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
        HiFTTrainer(model=model, args=args, train_dataset=dataset, hift_args={"eps": 1e-3}).train()
    assert len(divisors) == 8 and all(torch.is_tensor(d) for d in divisors)
    assert_params_close(models[1], models[0], rtol=1e-4, atol=1e-6)


# ---- the methods, the job and the bench -----------------------------------------------------

def test_methods_apply_the_efficient_loss_and_close_removes_it(torch_path):
    ids, labels = batch()
    for cls in (methods.Full, methods.HiFT, methods.LayerwiseSync):
        model = llama()
        method = cls(model, methods.Settings(lr=1e-3, offload=False, efficient_loss=True))
        method.before_forward(0)
        out = method.model(input_ids=ids, labels=labels)
        assert out.logits is None, cls.__name__
        method.backward(out.loss)
        method.update()
        method.close()
        assert model(input_ids=ids, labels=labels).logits is not None, cls.__name__


def test_job_efficient_loss_option(torch_path):
    notes = []
    small, large = llama(vocab=301), llama(vocab=options.EFFICIENT_LOSS_MIN_VOCAB)
    assert train.use_efficient_loss("auto", small, notes.append) is False
    assert train.use_efficient_loss("auto", large, notes.append) is True
    assert train.use_efficient_loss("on", small, notes.append) is True
    assert train.use_efficient_loss("off", large, notes.append) is False
    _soft_capping(large)
    assert train.use_efficient_loss("auto", large, notes.append) is False
    assert len(notes) == 1 and "final_logit_softcapping" in notes[0]
    with pytest.raises(train.JobError, match="--efficient-loss on: .*final_logit_softcapping"):
        train.use_efficient_loss("on", large, notes.append)


def test_job_runs_with_the_efficient_loss(torch_path, tmp_path, capsys):
    from hift_rt.cli import main

    directory = tmp_path / "model"
    llama(vocab=256).save_pretrained(directory)
    out = tmp_path / "run.json"
    assert main(["finetune", "--model", str(directory), "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                 "--warmup-steps", "1", "--efficient-loss", "on", "--json", str(out)]) == 0
    result = json.loads(out.read_text())[0]
    assert result["efficient_loss"] is True and all(math.isfinite(x) for x in result["losses"])
    assert "efficient loss (no full logits)" in capsys.readouterr().out


def test_bench_efficient_loss_option(torch_path, tmp_path):
    from hift_rt.bench import finetune as bench
    from hift_rt.bench.__main__ import main

    assert bench.PRESETS["8b"].efficient_loss and not bench.PRESETS["1b"].efficient_loss
    out = tmp_path / "ft.json"
    assert main(["finetune", "--preset", "tiny", "--seq", "8", "--methods", "hift", "--cycles", "1",
                 "--efficient-loss", "on", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["efficient_loss"] is True
    assert report["methods"]["hift"]["step_s"] > 0
