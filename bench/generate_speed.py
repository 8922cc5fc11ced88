"""Decoding speed: HELM's cached generation against Hugging Face's cached ``generate`` on the same
architecture, and the cost of one decoding step as the sequence grows.

    python bench/generate_speed.py                                   # CPU, prints the table
    python bench/generate_speed.py --out bench/results/generate_speed_cpu.json
    python bench/generate_speed.py --device cuda --out ...           # the GPU suite's step

Both sides decode greedily from random weights (speed does not depend on them), every row to the
full length (HELM: ``min_length``; HF: ``min_new_tokens``), so both make the same number of tokens.
Each figure is the minimum over ``--runs`` runs, the least disturbed by other work on the machine.

Pairs: GPT-2 (4 layers, width 128, 4 heads, vocabulary 72; the KV cache) and Mamba-1 (4 layers,
width 128, d_state 16, no MLP, as HF's ``MambaForCausalLM``; the recurrent state). The per-step
table times one ``decode`` call at growing positions: GPT-2's attention grows with the cache,
Mamba's recurrence is flat, Hyena's cached step convolves with the whole history (O(t)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helm.generate import Prompt, generate  # noqa: E402
from helm.kernels.bench.rows import cpu_name  # noqa: E402
from helm.models import build_model  # noqa: E402
from helm.vocab import NUM_SPECIAL  # noqa: E402

WIDTH, LAYERS, HEADS, PADDED_VOCAB = 128, 4, 4, 72
VOCAB_SIZE = NUM_SPECIAL + 64  # the codon vocabulary (69), padded to 72 in the models


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def best_time(fn, runs: int, device: torch.device) -> float:
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def pair(kind: str, max_len: int, device: torch.device):
    """HELM's model and HF's model of the same architecture (random weights)."""
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        ours = build_model("gpt2", vocab_size=VOCAB_SIZE, d_model=WIDTH, num_layers=LAYERS,
                           num_heads=HEADS, max_seq_len=max_len)  # fmt: skip
        cfg = transformers.GPT2Config(vocab_size=PADDED_VOCAB, n_positions=max_len, n_embd=WIDTH,
                                      n_layer=LAYERS, n_head=HEADS, bos_token_id=1, eos_token_id=2)  # fmt: skip
        theirs = transformers.GPT2LMHeadModel(cfg)
    else:
        ours = build_model("mamba", vocab_size=VOCAB_SIZE, d_model=WIDTH, num_layers=LAYERS,
                           d_ff=0, d_state=16, max_seq_len=max_len, scan_impl="torch")  # fmt: skip
        cfg = transformers.MambaConfig(vocab_size=PADDED_VOCAB, hidden_size=WIDTH, state_size=16,
                                       num_hidden_layers=LAYERS, expand=2, conv_kernel=4)  # fmt: skip
        theirs = transformers.MambaForCausalLM(cfg)
    return ours.to(device).eval(), theirs.to(device).eval()


def generation(kind: str, rows: int, tokens: int, runs: int, device: torch.device) -> dict:
    ours, theirs = pair(kind, tokens + 8, device)
    prompts = [Prompt("p", [5])]

    def helm_generate() -> None:
        generate(ours, prompts, rows, vocab_size=VOCAB_SIZE, max_length=tokens,
                 min_length=tokens, top_k=1, device=device)  # fmt: skip

    def hf_generate() -> None:
        ids = torch.full((rows, 2), 5, device=device)
        with torch.no_grad():
            theirs.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                            use_cache=True, pad_token_id=0, eos_token_id=None)  # fmt: skip

    helm_generate(), hf_generate()  # warm-up
    made = rows * tokens
    helm_s, hf_s = best_time(helm_generate, runs, device), best_time(hf_generate, runs, device)
    return {
        "rows": rows,
        "new_tokens_per_row": tokens,
        "helm_s": round(helm_s, 4),
        "hf_s": round(hf_s, 4),
        "helm_tokens_per_s": round(made / helm_s, 1),
        "hf_tokens_per_s": round(made / hf_s, 1),
        "helm_cost_per_token_vs_hf": round(helm_s / hf_s, 3),
    }


def step_cost(name: str, positions: list[int], rows: int, device: torch.device) -> dict:
    """Milliseconds of one cached ``decode`` step at each position (the cache filled up to it)."""
    kwargs = dict(vocab_size=VOCAB_SIZE, d_model=WIDTH, num_layers=LAYERS,
                  max_seq_len=max(positions) + 2)  # fmt: skip
    kwargs |= {"gpt2": dict(num_heads=HEADS), "mamba": dict(d_ff=0, scan_impl="torch")}.get(
        name, {}
    )
    torch.manual_seed(0)
    model = build_model(name, **kwargs).to(device).eval()
    out = {}
    with torch.no_grad():
        for t in positions:
            prompt = torch.randint(5, VOCAB_SIZE, (rows, t), device=device)
            token = torch.full((rows, 1), 5, device=device)
            times = []
            for _ in range(7):  # a freshly filled cache each time: every step sees t tokens
                cache = model.allocate_cache(rows, t + 1)
                model.decode(prompt, cache)
                times.append(best_time(lambda c=cache, x=token: model.decode(x, c), 1, device))
            out[str(t)] = round(1e3 * min(times), 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=4, help="sequences decoded together")
    p.add_argument("--tokens", type=int, default=400, help="new tokens per sequence")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--positions", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    result = {
        "device": device_name(device),
        "command": "python " + " ".join(sys.argv),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_1min_before": os.getloadavg()[0],  # other work on the host skews CPU timings
        "generate": {},
        "step_ms": {},
    }
    for kind in ("gpt2", "mamba"):
        figures = generation(kind, args.rows, args.tokens, args.runs, device)
        result["generate"][kind] = figures
        print(f"{kind:6s} HELM {figures['helm_tokens_per_s']:8.1f} tok/s   HF "
              f"{figures['hf_tokens_per_s']:8.1f} tok/s   HELM/HF cost per token "
              f"{figures['helm_cost_per_token_vs_hf']:.3f}", flush=True)  # fmt: skip
    for name in ("gpt2", "mamba", "hyena"):
        result["step_ms"][name] = step_cost(name, args.positions, args.rows, device)
        print(f"{name:6s} ms per step at position " + "  ".join(
            f"{t}: {ms}" for t, ms in result["step_ms"][name].items()), flush=True)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
