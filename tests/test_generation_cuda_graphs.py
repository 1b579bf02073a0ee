"""The device paths: what CUDA runs, checked on a GPU where there is one, and the
device-independent parts of it on the CPU everywhere.

On a GPU: recorded decode steps against eager steps and the plain model; the quantized formats
(codes in GPU memory, dequantized per forward pass with PyTorch ops) against the same maths on
the CPU and against the float model; tensor parallelism over NCCL with one rank. On the CPU:
the PyTorch compute those formats use on CUDA (native kernels off), and the tensor-parallel
transform with one rank over gloo.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from helpers import random_state_dict, tiny_config, tiny_model, write_hf_tokenizer
from safetensors.torch import save_file
from torch import nn

import qwenlm
from qwenlm.generation.engine import Engine
from qwenlm.quant import Int8Embedding
from qwenlm.quant.linear import KernelLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPT = [(5 * i + 1) % 300 for i in range(30)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config(tie_word_embeddings=True, intermediate_size=128)
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    save_file(random_state_dict(cfg, std=0.1), str(out / "model.safetensors"))
    write_hf_tokenizer(out)
    return out


def no_kernels(monkeypatch) -> None:
    """Every native-kernel call site falls back to PyTorch ops, as on a CUDA device."""
    monkeypatch.setattr("qwenlm.quant.linear.cpu_kernels", lambda: None)
    monkeypatch.setattr("qwenlm.generation.fastpath.cpu_kernels", lambda: None)


def float_twin(model: nn.Module) -> nn.Module:
    """The model with each quantized layer replaced by a float layer of its dequantized weight."""
    import copy

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        parent, _, attr = name.rpartition(".")
        if isinstance(m, KernelLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            new.weight = nn.Parameter(m.dequantize().clone(), requires_grad=False)
            if m.bias is not None:
                new.bias = nn.Parameter(m.bias.clone(), requires_grad=False)
        elif isinstance(m, Int8Embedding):
            new = nn.Embedding.from_pretrained(m.weight.clone(), freeze=True)
        else:
            continue
        setattr(twin.get_submodule(parent) if parent else twin, attr, new)
    return twin


@pytest.mark.parametrize("mode", ["f32", "int8", "int4"])
def test_quantized_formats_without_kernels_equal_their_dequantized_weights(
    folder, monkeypatch, mode
):
    # What CUDA runs for --quant int8/int4/f32, here on the CPU: F.linear on the weight
    # dequantized in PyTorch, through the engine. It must equal a float model holding those
    # weights (float32 rounding apart), and stay near the unquantized model.
    no_kernels(monkeypatch)
    q = qwenlm.load(folder, quant=mode, device="cpu")
    got = q.logits(PROMPT)
    twin = Engine(float_twin(q.model))
    want = twin.prefill(twin.new_sequence(), PROMPT)
    torch.testing.assert_close(got[-1], want, rtol=1e-5, atol=1e-5)
    ref = qwenlm.load(folder, quant="none", device="cpu").logits(PROMPT)
    # the formats' own rounding on random weights (int4: steps of 1/15 of a group's range)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < {"f32": 1e-5, "int8": 0.06, "int4": 0.5}[mode]


def world_of_one(backend: str, device: str) -> None:
    """Tensor parallelism with one rank: the transform and the leader engine, no followers."""
    from qwenlm.generation.mirror import parallel_engine
    from qwenlm.parallel import tensor_parallel

    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain = Engine(tiny_model(tiny_config(), seed=1).to(device), cuda_graphs=False)
        want = plain.prefill(plain.new_sequence(), PROMPT, all_logits=True)
        split = tensor_parallel(tiny_model(tiny_config(), seed=1)).to(device)
        engine = parallel_engine(split)
        got = engine.prefill(engine.new_sequence(), PROMPT, all_logits=True)
        engine.close()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_with_one_rank_on_gloo():
    world_of_one("gloo", "cpu")


# -- on a GPU ---------------------------------------------------------------------------------
@cuda
def test_cuda_graph_decode_equals_eager_decode_and_the_full_forward():
    model = tiny_model(tiny_config(num_hidden_layers=3), seed=0, std=0.1).cuda()
    model.fuse_projections()
    graphs, eager = Engine(model), Engine(model, cuda_graphs=False)
    assert graphs.graphs is not None and eager.graphs is None
    prompt = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    s1, s2 = graphs.new_sequence(), eager.new_sequence()
    graphs.forward([(s1, prompt)])
    eager.forward([(s2, prompt)])
    tokens = list(prompt)
    for t in torch.randint(0, 300, (1100,), generator=torch.Generator().manual_seed(1)).tolist():
        # 1100 steps cross the cache's first capacity step, so a new graph is recorded mid-way
        (a,) = graphs.forward([(s1, [t])])
        (b,) = eager.forward([(s2, [t])])
        tokens.append(t)
        # the same kernels replayed: 1e-4 of the largest logit (~800 float32 ulps) allows GPU
        # matmuls that pick another reduction order per shape; a stale graph is off by O(1)
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    with torch.inference_mode():
        full = model(torch.tensor([tokens], device="cuda"))[0, -1].float()
    # 1120 positions through a cache against one full forward: float32 rounding only
    assert (a - full).abs().max() <= 1e-4 * full.abs().max()


@cuda
def test_recorded_steps_ignore_what_unwritten_cache_memory_holds(folder, monkeypatch):
    # A recorded step attends over the cache's whole capacity under a mask; a masked
    # position's value still meets a zero weight, so NaN bits left in GPU memory by earlier
    # work once turned a reply into garbage. With NaN in every new block the allocator hands
    # out, the recorded steps must still give the eager steps' logits (the same tokens fed).
    gpu = qwenlm.load(folder, quant="f32", device="cuda")
    engine, tokens = gpu.engine, [7, 3, 250, 12, 99, 5, 61, 8, 140, 2]

    def steps() -> torch.Tensor:
        seq = engine.new_sequence()
        out = [engine.prefill(seq, PROMPT)]
        out += [engine.forward([(seq, [t])])[0] for t in tokens]
        return torch.stack(out).cpu()

    graphs, engine.graphs = engine.graphs, None
    eager = steps()
    engine.graphs = graphs
    assert graphs is not None
    real_empty = torch.Tensor.new_empty

    def poisoned(t, *args, **kwargs):
        out = real_empty(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    recorded = steps()
    assert torch.isfinite(recorded).all()
    torch.testing.assert_close(recorded, eager, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("mode", ["f32", "int8", "int4"])
def test_quantized_formats_run_on_cuda(folder, monkeypatch, mode):
    gpu = qwenlm.load(folder, quant=mode, device="cuda")
    assert gpu.device.type == "cuda" and gpu.weight_format.startswith(mode)
    assert all(b.device.type == "cuda" for b in gpu.model.buffers())
    got = gpu.logits(PROMPT).cpu()
    no_kernels(monkeypatch)
    want = qwenlm.load(folder, quant=mode, device="cpu").logits(PROMPT)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # decoding replays recorded steps (a dense model): the same tokens as the CPU
    options = dict(temperature=0, max_new_tokens=16, ignore_eos=True)
    cpu = qwenlm.load(folder, quant=mode, device="cpu")
    assert gpu.generate(PROMPT, **options) == cpu.generate(PROMPT, **options)


@cuda
def test_tensor_parallel_with_one_rank_on_nccl():
    world_of_one("nccl", "cuda")
