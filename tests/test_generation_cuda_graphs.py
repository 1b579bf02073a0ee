"""The CUDA path: recorded decode steps against eager steps and the plain model (GPU only)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, tiny_model

from qwenlm.generation.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
