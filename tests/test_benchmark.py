"""The measuring machinery: `qwenlm profile` end to end on a tiny model folder, the roofline
arithmetic (bytes a decode step reads, FLOPs a prefill token costs) against the model's own
tensors, the per-matrix and batching microbenchmarks, and benchmarks/compare.py's pieces
(llama-bench's JSON, the busy loop, the tables). Behaviour only: nothing here checks a timing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QWEN_TEMPLATE, tiny_config, tiny_model, tiny_tokenizer, write_tiny_gguf

import qwenlm
from qwenlm.benchmark import (
    gguf_bytes_per_token,
    isa_text,
    kv_bytes_per_position,
    measure_batching,
    measure_matrices,
    perplexity,
    perplexity_windows,
    prefill_flops_per_token,
    weight_bytes_per_token,
    window_nll,
)
from qwenlm.cli import main as cli_main
from qwenlm.weights.gguf import GGUFFile
from qwenlm.weights.hf_writer import write_hf_folder

ROOT = Path(__file__).resolve().parent.parent


def _compare():
    """benchmarks/compare.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench") / "model"
    return write_hf_folder(
        folder,
        config=tiny_config(),
        tensors=dict(tiny_model(std=0.1).state_dict()),
        tokenizer=tiny_tokenizer(),
        chat_template=QWEN_TEMPLATE,
    )


# -- qwenlm profile ---------------------------------------------------------------------------


def test_profile_runs_end_to_end_and_writes_its_table(tiny_folder, tmp_path, capsys):
    out = tmp_path / "profile.json"
    argv = ["profile", str(tiny_folder), "--quant", "int8", "f32", "--context", "1", "40"]
    assert cli_main([*argv, "--tokens", "3", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    head = next(line for line in table.splitlines() if line.startswith("| format"))
    assert head.split(" | ")[1:] == [
        "decode tok/s @1",
        "decode tok/s @40",
        "prefill tok/s @40",
        "peak MB @1",
        "peak MB @40 |",
    ]
    rows = [line for line in table.splitlines() if line.startswith(("| int8", "| f32"))]
    assert len(rows) == 2 and all("-" not in r.split("|")[2] for r in rows)
    data = json.loads(out.read_text())
    cells = {(c["quant"], c["context"]): c for c in data["cells"]}
    assert set(cells) == {("int8", 1), ("int8", 40), ("f32", 1), ("f32", 40)}
    assert all(c["decode_tok_s"] > 0 and c["peak_rss_mb"] > 0 for c in cells.values())
    assert cells[("int8", 1)]["prefill_tok_s"] is None  # nothing to prefill at 1 token
    assert cells[("int8", 40)]["prefill_tok_s"] > 0


def test_profile_leaves_out_a_cell_over_its_time_limit(tiny_folder, monkeypatch, capsys):
    import qwenlm.benchmark as bench

    def too_slow(spec, timeout):
        if spec["context"] > 1:
            raise subprocess.TimeoutExpired("worker", timeout)
        return {
            "quant": spec["quant"],
            "weight_format": "int8",
            "context": 1,
            "decode_tok_s": 5.0,
            "prefill_tok_s": None,
            "peak_rss_mb": 100.0,
        }

    monkeypatch.setattr(bench, "run_profile_cell", too_slow)
    assert (
        cli_main(["profile", str(tiny_folder), "--quant", "int8", "--long", "--timeout", "1"]) == 0
    )
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.startswith("| int8"))
    assert row.split(" | ")[1:] == ["5.00", "-", "-", "-", "-", "100", "-", "- |"]
    assert "left out: over 1 s" in captured.err


def test_profile_refuses_an_empty_context(tiny_folder, capsys):
    assert cli_main(["profile", str(tiny_folder), "--context", "0"]) != 0
    assert "at least 1" in capsys.readouterr().err


# -- the roofline arithmetic -------------------------------------------------------------------


def test_prefill_flops_count_every_decoder_weight_twice_plus_attention_and_head():
    config = tiny_config()
    model = tiny_model(config)
    weights = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".layers." in n and n.endswith("proj.weight")
    )
    n = 100
    c = config
    attention = c.num_hidden_layers * 4 * c.num_attention_heads * c.head_dim * (n + 1) / 2
    head = 2 * c.hidden_size * c.vocab_size / n
    assert prefill_flops_per_token(config, n) == pytest.approx(2 * weights + attention + head)
    assert (
        prefill_flops_per_token(
            tiny_config(
                model_type="qwen2_moe",
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
            ),
            n,
        )
        is None
    )


def test_kv_bytes_per_position():
    c = tiny_config()
    assert (
        kv_bytes_per_position(c, 2)
        == c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
    )


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_bytes_per_token_reads_each_tensor_once_and_one_embedding_row(tmp_path, tied):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tiny_config(tie_word_embeddings=tied), qtype="Q8_0")
    with GGUFFile(str(path)) as gf:
        tensors = dict(gf.tensors)
    embd = tensors["token_embd.weight"]
    assert ("output.weight" in tensors) is not tied
    rest = sum(t.nbytes for n, t in tensors.items() if n != "token_embd.weight")
    # a tied model reads the whole embedding as its output head, and one row of it as input
    head = embd.nbytes if tied else 0
    assert gguf_bytes_per_token(path) == rest + head + embd.nbytes // embd.shape[0]


def test_weight_bytes_per_token_counts_the_head_and_one_embedding_row(tiny_folder):
    model = qwenlm.load(tiny_folder, quant="none", dtype="float32")
    c = model.config
    everything = sum(p.nbytes for p in model.model.parameters())
    embedding = c.vocab_size * c.hidden_size * 4
    assert weight_bytes_per_token(model) == everything - embedding + c.hidden_size * 4


def test_perplexity_windows_and_nll_match_a_direct_computation(tiny_folder):
    ids = list(range(10))
    assert perplexity_windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert perplexity_windows(list(range(9)), 4) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]  # [8] scores nothing
    logits = torch.randn(4, 7)
    window = [1, 5, 2, 6]
    lp = torch.log_softmax(logits, -1)
    assert window_nll(logits, window) == pytest.approx(-(lp[0, 5] + lp[1, 2] + lp[2, 6]).item())
    model = qwenlm.load(tiny_folder, quant="none", dtype="float32")
    assert perplexity(model, tokens=64, window=32) > 1


def test_isa_text_names_what_the_cpu_lacks_and_the_kernels_run():
    info = {"isa": ["avx2", "fma"], "kernels": "avx2"}
    assert isa_text(info) == "avx2 fma; no avx512, no vnni; qwenlm kernels avx2"
    info = {"isa": ["avx2", "avx512f", "avx512_vnni"], "kernels": None}
    assert isa_text(info) == "avx2 avx512f avx512_vnni; qwenlm kernels none"


# -- microbenchmarks ---------------------------------------------------------------------------


def test_matrix_benchmark_covers_one_layer_and_the_head(tiny_folder):
    model = qwenlm.load(tiny_folder, quant="int8")
    rows = measure_matrices(model, bandwidth_gb_s=10.0, repeats=2, flush_mb=4)
    names = [r["matrix"] for r in rows]
    assert names[-1] == "lm_head" and len(names) >= 3
    assert all(n.startswith("layers.0.") for n in names[:-1])
    c = model.config
    assert rows[-1]["shape"] == [c.vocab_size, c.hidden_size]
    assert all(r["bytes"] > 0 and r["seconds"] > 0 and r["bandwidth_fraction"] > 0 for r in rows)


def test_batching_benchmark_gives_ratios_to_one_row_and_leaves_no_tokens_behind(tiny_folder):
    model = qwenlm.load(tiny_folder, quant="int8")
    engine = model.engine
    made = []
    real_new = engine.new_sequence
    engine.new_sequence = lambda: made.append(real_new()) or made[-1]
    rows = measure_batching(model, (1, 2, 4), context=8, repeats=2)
    assert [r["rows"] for r in rows] == [1, 2, 4]
    assert rows[0]["batch_ratio"] == rows[0]["verify_ratio"] == 1.0
    assert all(r["batch_s"] > 0 and r["verify_s"] > 0 for r in rows)
    assert len(made) == 4 and all(len(s) == 8 for s in made)  # each step was taken back


# -- benchmarks/compare.py ---------------------------------------------------------------------


LLAMA_BENCH_JSON = """main: some log line on stdout
[
  {"test": "pp512", "n_prompt": 512, "n_gen": 0, "avg_ts": 101.5},
  {"test": "tg128", "n_prompt": 0, "n_gen": 128, "avg_ts": 40.25},
  {"test": "tg128@pp2048", "n_prompt": 2048, "n_gen": 128, "avg_ts": 30.0}
]
"""


def test_llama_bench_command_and_output():
    compare = _compare()
    spec = {
        "ik_llama_bench": "/x/llama-bench",
        "gguf": "m.gguf",
        "threads": 2,
        "vnni": False,
        "decode_tokens": 128,
        "prefill": [512, 2048],
        "contexts": [0, 2048],
    }
    cmd = compare.llama_bench_command(spec)
    assert cmd[:6] == ["/x/llama-bench", "-m", "m.gguf", "-t", "2", "-rtr"]
    assert cmd[cmd.index("-rtr") + 1] == "1" and cmd[cmd.index("-fa") + 1] == "0"
    assert cmd[cmd.index("-p") + 1] == "512,2048" and cmd[cmd.index("-gp") + 1] == "2048,128"
    assert compare.parse_llama_bench(LLAMA_BENCH_JSON) == {
        "prefill@512": 101.5,
        "decode@0": 40.25,
        "decode@2048": 30.0,
    }


def test_busy_loop_spins_until_stopped():
    compare = _compare()
    proc = compare.start_busy()
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.5)
    finally:
        compare.stop(proc)
    assert proc.returncode is not None


def test_roofline_and_ratios():
    compare = _compare()
    config = tiny_config()
    kv = kv_bytes_per_position(config, 2)
    row = {
        "decode@0": 10.0,
        "decode@100": 5.0,
        "prefill@64": 50.0,
        "ttft@64": 1.0,
        "bytes_per_token": 1e9,
        "kv_element_bytes": 2,
        "peak_rss_mb": 1.0,
    }
    roof = compare.roofline(row, config=config, bandwidth=20.0, matmul=100.0, decode_tokens=8)
    assert set(roof) == {"decode@0", "decode@100", "prefill@64"}
    assert roof["decode@0"]["ceiling"] == pytest.approx(20e9 / (1e9 + kv * 5))
    assert roof["decode@100"]["fraction"] == pytest.approx(5.0 / (20e9 / (1e9 + kv * 104)))
    flops = prefill_flops_per_token(config, 64)
    assert roof["prefill@64"]["fraction"] == pytest.approx(50.0 / (100e9 / flops))
    rows = {
        "llama.cpp": {"decode@0": 10.0},
        "qwenlm:int8": {"decode@0": 15.0},
        "llama.cpp +busy": {"decode@0": 5.0},
        "qwenlm:int8 +busy": {"decode@0": 12.0},
    }
    assert compare.ratio_lines(rows, ["decode@0"]) == [
        "- qwenlm:int8 vs llama.cpp: decode@0 1.50x",
        "- qwenlm:int8 +busy vs llama.cpp +busy: decode@0 2.40x",
        "- llama.cpp +busy keeps of its quiet speed: decode@0 50%",
        "- qwenlm:int8 +busy keeps of its quiet speed: decode@0 80%",
    ]


def test_medians_over_rounds_include_each_matrix():
    compare = _compare()
    m = {"matrix": "lm_head", "shape": [2, 2], "bytes": 100}
    runs = [
        {"decode@0": 1.0, "matrices": [{**m, "seconds": 1.0, "bandwidth_fraction": 0.5}]},
        {"decode@0": 3.0, "matrices": [{**m, "seconds": 4.0, "bandwidth_fraction": 0.125}]},
        {"decode@0": 2.0, "matrices": [{**m, "seconds": 2.0, "bandwidth_fraction": 0.25}]},
    ]
    out = compare.medians(runs)
    assert out["decode@0"] == 2.0
    assert out["matrices"][0]["seconds"] == 2.0
    assert out["matrices"][0]["bandwidth_fraction"] == pytest.approx(0.25)


def test_unknown_engines_are_named():
    compare = _compare()
    assert "no qwenlm mode" in compare.engine_problem("qwenlm:int3", None)
    assert "unknown engine" in compare.engine_problem("vllm", None)
    assert "--ik-llama-bench" in compare.engine_problem("ik-llama-bench", None)
    assert compare.engine_problem("qwenlm:int8", None) is None
    assert compare.engine_problem("qwenlm:gguf+f16", None) is None
    assert "no KV cache format" in compare.engine_problem("qwenlm:gguf+f8", None)


def test_build_ik_llama_script_refuses_a_folder_that_is_not_ik_llama(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "build_ik_llama.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "must be an ik_llama.cpp checkout" in proc.stderr


def test_batching_script_prints_the_ratios(tiny_folder, tmp_path):
    script = str(ROOT / "benchmarks" / "batching.py")
    args = ["--model", str(tiny_folder), "--rows", "4", "--context", "8", "--repeats", "1"]
    proc = subprocess.run(
        [sys.executable, script, *args, "--threads", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "batching.json").read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 4]  # the 1-row step is always measured
    assert "| 4 |" in proc.stdout and "<= 1.5x" in proc.stdout


def test_batching_peers_run_the_same_gguf_file(tiny_folder, tmp_path):
    script = str(ROOT / "benchmarks" / "batching.py")
    args = ["--rows", "4", "--context", "8", "--repeats", "1", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, script, "--model", str(tiny_folder), *args, "--peers", "llama.cpp"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "--peers runs a GGUF file in every engine" in proc.stderr
    pytest.importorskip("llama_cpp")
    from qwenlm.cli.export import export_gguf

    gguf = export_gguf(tiny_folder, tmp_path / "tiny.gguf", type="q8_0")  # as llama.cpp reads it
    proc = subprocess.run(
        [sys.executable, script, "--model", str(gguf), *args, "--peers", "llama.cpp"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    peers = json.loads((tmp_path / "benchmarks" / "results" / "batching.json").read_text())
    assert sorted(peers["peers"]["llama.cpp"]) == ["1", "4"]
    assert all(t > 0 for t in peers["peers"]["llama.cpp"].values())
    assert "llama.cpp verification ms" in proc.stdout


def test_serve_benchmark_prints_the_scaling_to_the_most_clients():
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "benchmarks" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    rows = [
        {"server": "qwenlm", "concurrency": 1, "tokens_per_s": 10.0},
        {"server": "qwenlm", "concurrency": 8, "tokens_per_s": 36.0},
        {"server": "llama.cpp", "concurrency": 1, "tokens_per_s": 4.0},
        {"server": "llama.cpp", "concurrency": 4, "tokens_per_s": 4.4},
    ]
    assert serve.scaling(rows) == [
        "qwenlm: 8 clients deliver 3.60x one client's output tokens/s",
        "llama.cpp: 4 clients deliver 1.10x one client's output tokens/s",
    ]
