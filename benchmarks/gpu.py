"""qwenlm on a CUDA GPU against transformers in the same run: correctness and speed.

    python benchmarks/gpu.py                      # Qwen2.5-0.5B shapes, random weights
    python benchmarks/gpu.py --shape 1.5b --out results/

Both engines get the very same weights (drawn at random with the model's shapes, since a GPU
machine may have no model files; the speed of a decode step does not depend on the values), so
the check is exact: float32 logits of a 128-token prompt and greedy continuations are compared,
then bfloat16 speed is measured: decode tokens/s (128 tokens after a 1- and a 2048-token
context), prefill tokens/s (512 and 2048 tokens). qwenlm runs with CUDA graphs (its default) and
without; transformers runs `generate` with its default dynamic cache and SDPA attention.
Writes gpu.json and gpu.md to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}  # fmt: skip


def hf_config(shape: str) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_sliding_window": False,
        **SHAPES[shape],
    }


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def qwenlm_model(cfg: dict, state: dict, dtype: torch.dtype):
    from qwenlm.config import ModelConfig
    from qwenlm.models import build_model

    model = build_model(ModelConfig.from_hf(cfg), state.items(), dtype=dtype, device="cuda")
    model.fuse_projections()
    return model.eval()


def qwenlm_decode(
    engine, prompt: list[int], n: int, keep: list | None = None
) -> tuple[list[int], float]:
    """Greedy tokens and decode seconds; ``keep`` collects each step's input logits."""
    seq = engine.new_sequence()
    (logits,) = engine.forward([(seq, prompt)])
    out = []
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        if keep is not None:
            keep.append(logits)
        tok = int(logits.argmax())
        out.append(tok)
        (logits,) = engine.forward([(seq, [tok])])
    sync()
    return out, time.perf_counter() - t0


def hf_decode(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        # Prefill outside the timer, as for qwenlm: the decode rate alone.
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks = []
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            toks.append(int(nxt))
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
    return toks, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 1
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwenlm.generation.engine import Engine

    torch.manual_seed(0)
    cfg = hf_config(args.shape)
    hf = Qwen2ForCausalLM(Qwen2Config(**cfg)).to("cuda").eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": args.shape,
    }

    # -- correctness, float32 ---------------------------------------------------------------
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg["vocab_size"], (128,), generator=g).tolist()
    ours = qwenlm_model(cfg, state, torch.float32)
    engine = Engine(ours)
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
        seq = engine.new_sequence()
        got = engine.forward([(seq, prompt)], all_logits=True)[0]
    results["f32_max_abs_logit_diff"] = float((got - ref).abs().max())
    results["f32_max_abs_logit"] = float(ref.abs().max())
    # Greedy decoding with CUDA graphs, checked step by step against transformers run over
    # the same tokens: every step's logits, and every chosen token (random weights give flat
    # logits, so a token may differ only where transformers' top two are a float-rounding tie).
    a, _ = qwenlm_decode(engine, prompt, 64, keep=(steps := []))
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt + a], device="cuda")).logits[0, len(prompt) - 1 : -1].float()
    got = torch.stack(steps)  # steps[i] chose a[i]; ref row i is the same position
    results["f32_decode_max_abs_logit_diff"] = float((got - ref).abs().max())
    top2 = ref.topk(2, dim=-1).values
    ties = (top2[:, 0] - top2[:, 1]) < 1e-4
    chosen = torch.tensor(a, device="cuda")
    mismatch = ref.argmax(-1) != chosen
    results["f32_greedy_steps"] = len(a)
    results["f32_greedy_same_token"] = int((~mismatch).sum())
    results["f32_greedy_differs_at_a_tie"] = int((mismatch & ties).sum())
    results["f32_greedy_differs_otherwise"] = int((mismatch & ~ties).sum())
    b, _ = qwenlm_decode(Engine(ours, cuda_graphs=False), prompt, 64)
    results["f32_graphs_equal_eager_tokens"] = sum(x == y for x, y in zip(a, b, strict=True))
    del ours, engine

    # -- speed, bfloat16 ------------------------------------------------------------------
    hf = hf.to(torch.bfloat16)
    ours = qwenlm_model(cfg, state, torch.bfloat16)
    engines = {
        "qwenlm (CUDA graphs)": Engine(ours),
        "qwenlm (eager)": Engine(ours, cuda_graphs=False),
    }
    long = torch.randint(0, cfg["vocab_size"], (2048,), generator=g).tolist()
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for name, eng in engines.items():
            r = rows.setdefault(name, {})
            for ctx in (1, 2048):
                _, dt = qwenlm_decode(eng, long[:ctx], 128)
                r.setdefault(f"decode@{ctx}", []).append(128 / dt)
            for n in (512, 2048):
                seq = eng.new_sequence()
                dt = timed(lambda seq=seq, n=n, eng=eng: eng.forward([(seq, long[:n])]))
                r.setdefault(f"prefill@{n}", []).append(n / dt)
        r = rows.setdefault("transformers", {})
        for ctx in (1, 2048):
            _, dt = hf_decode(hf, long[:ctx], 128)
            r.setdefault(f"decode@{ctx}", []).append(128 / dt)
        for n in (512, 2048):
            ids = torch.tensor([long[:n]], device="cuda")
            with torch.inference_mode():
                dt = timed(lambda ids=ids: hf(ids, use_cache=True, logits_to_keep=1))
            r.setdefault(f"prefill@{n}", []).append(n / dt)
    med = {e: {k: statistics.median(v) for k, v in r.items()} for e, r in rows.items()}
    results["bf16_tokens_per_s"] = med
    results["bf16_runs"] = rows
    keys = ["decode@1", "decode@2048", "prefill@512", "prefill@2048"]
    lines = [
        f"{results['gpu']}, torch {results['torch']}, transformers {results['transformers']}, "
        f"Qwen2.5-{args.shape} shapes, bfloat16, tokens/s, medians of {args.rounds} rounds.",
        "",
        "| engine | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for e, r in med.items():
        lines.append(f"| {e} | " + " | ".join(f"{r[k]:.0f}" for k in keys) + " |")
    hfm = med["transformers"]
    for e in engines:
        lines.append(
            f"\n{e} vs transformers: " + ", ".join(f"{k} {med[e][k] / hfm[k]:.2f}x" for k in keys)
        )
    lines.append(
        f"\nfloat32 check: max |logit diff| {results['f32_max_abs_logit_diff']:.2e} "
        f"(max |logit| {results['f32_max_abs_logit']:.2f}) over a 128-token prompt; "
        f"{results['f32_greedy_steps']} greedy steps with CUDA graphs: max |logit diff| "
        f"{results['f32_decode_max_abs_logit_diff']:.2e}, same token as transformers "
        f"{results['f32_greedy_same_token']}, different at a top-2 tie "
        f"{results['f32_greedy_differs_at_a_tie']}, different otherwise "
        f"{results['f32_greedy_differs_otherwise']}; tokens equal to eager qwenlm: "
        f"{results['f32_graphs_equal_eager_tokens']}/{results['f32_greedy_steps']}"
    )
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=1))
    (out / "gpu.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
