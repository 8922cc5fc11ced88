"""Memory of a training rank under DDP, FSDP and FSDP + activation checkpointing: the memory model
README states, its predictions, and the peak RSS measured on the CPU with 2 gloo ranks.

    python bench/memory.py                      # CPU, 2 gloo ranks, two GPT-2 sizes (~3 minutes)
    python bench/memory.py --sizes 4x256 8x512 --tokens 8x128 --steps 2

The model (bytes on one of N ranks, for a model of P parameters trained with AdamW, fp32 master
weights; A = the activations autograd keeps for the rank's micro-batch):

- DDP:  20 P + A. Weights 4, gradients 4, DDP's gradient buckets 4 (a copy of the gradients) and
  Adam's two moments 8 bytes a parameter (16 P in one process, without DDP). With bf16 autocast
  (GPU) add 2 P: autocast keeps a bf16 copy of each weight during the forward.
- FSDP: 16 P / N + W + A, where W is the working set of gathered units: the root (embeddings,
  final norm, head; kept gathered) plus two blocks (the running one and the next) and the
  whole gradients of one block before its reduce-scatter: 4 (P_root + 3 P_block) bytes in fp32,
  2 (P_root + 2 P_block) + 4 P_block with bf16 parameters (FSDP's mixed precision).
- FSDP + checkpointing: the same, with A replaced by the block inputs (B T D values a layer)
  plus one block's activations while it is recomputed.

A is counted, not guessed: the bytes of every tensor autograd saves in one forward of the real
model on the real batch (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded, each
storage once). Its part per token and layer, independent of the sequence length (attention
probabilities, which the CPU's math attention keeps and the GPU's flash attention does not, grow
with T and are fitted out from two lengths), counted with bf16 weights and activations, is what
the GPU predictions use for every strategy (bf16 autocast keeps some activations in fp32, so the
DDP rows are, if anything, optimistic).

Measured: each case runs in two fresh gloo ranks (one thread each): a throwaway model trains one
step (what the first update sets up once), then the model is built and wrapped, the peak-RSS mark
reset (``/proc/self/clear_refs``), ``--steps`` updates (forward, backward, clipping, AdamW) run on
random codons, and the rise of the peak RSS (VmHWM) over the RSS before the model was built is
the rank's figure (the larger of the two ranks). glibc is told to map every block of 64 KiB or
more on its own (``MALLOC_MMAP_THRESHOLD_=65536``), so a freed tensor leaves the RSS: the figure
is the peak of live memory, not of what the allocator keeps for reuse (without it the FSDP cases
read 1.3 to 2 times higher). Results, with device,
command and date, go to ``--out`` (default bench/results/memory_cpu.json). Linux only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from helm.kernels.bench.rows import cpu_name

STRATEGIES = ("ddp", "fsdp", "fsdp+ckpt")
GB = 1e9
MB = 2**20


def build(layers: int, width: int, seed: int = 0):
    from helm.lm import LanguageModel
    from helm.models import build_model

    torch.manual_seed(seed)
    cfg = dict(vocab_size=69, num_layers=layers, d_model=width, num_heads=max(1, width // 64),
               d_ff=4 * width, max_seq_len=1024, bidirectional=True)  # fmt: skip
    return LanguageModel(build_model("gpt2", **cfg))


def batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 69, (rows, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}  # every position a target: the worst case


def unit_params(model) -> tuple[int, int, int]:
    """(all parameters, those outside the blocks, the largest block's)."""
    total = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.backbone.blocks]
    return total, total - sum(blocks), max(blocks)


def saved_bytes(model, inputs: dict) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward (parameters and
    repeated storages counted once, parameters not at all)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


def per_token_layer(width: int, precision: str) -> float:
    """Bytes autograd keeps per token for one block, apart from the part that grows with the
    sequence (attention probabilities: the CPU's math attention keeps them, flash attention does
    not): the difference of 2 and 1 blocks, at T = 64 and 128, extrapolated to T = 0.
    ``precision``: fp32, or bf16_params (bf16 weights and activations, as FSDP's policy)."""

    def at(layers: int, length: int) -> int:
        model = build(layers, width)
        if precision == "bf16_params":
            model.to(torch.bfloat16)
        return saved_bytes(model, batch(2, length, 0))

    y = [(at(2, t) - at(1, t)) / (2 * t) for t in (64, 128)]
    return y[0] - (y[1] - y[0])  # a + b T at T = 0


def activations(layers: int, width: int, rows: int, length: int) -> dict[str, float]:
    """A of the rank's batch in fp32, with and without checkpointing, and the per-token-per-layer
    bytes in each precision."""
    from helm import parallel

    model = build(layers, width)
    out = {"fp32": saved_bytes(model, batch(rows, length, 0))}
    for precision in ("fp32", "bf16_params"):
        out[f"per_token_layer_{precision}"] = per_token_layer(width, precision)
    parallel.checkpoint_blocks(model)
    out["ckpt_fp32"] = saved_bytes(model, batch(rows, length, 0))
    return out


def predict(strategy: str, P: int, P_root: int, P_block: int, world: int, A: float,
            A_ckpt: float, A_block: float, bf16: bool = False) -> float:  # fmt: skip
    """Bytes on one rank (module docstring)."""
    if strategy == "ddp":  # one process: no DDP, so no gradient buckets
        return (20 if world > 1 else 16) * P + (2 * P if bf16 else 0) + A
    if bf16:
        working = 2 * (P_root + 2 * P_block) + 4 * P_block
    else:
        working = 4 * (P_root + 3 * P_block)
    static = 16 * P / world + working
    return static + (A if strategy == "fsdp" else A_ckpt + A_block)


# Measured: two gloo ranks per case -------------------------------------------------------------


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rank(rank: int, world: int, port: int, case: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from helm import parallel
    from helm.lm import forward_backward, optimizer_step
    from helm.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    micro = [batch(case["rows"], case["length"], seed=rank)]
    loss_fn = lambda logits, targets, reduction: torch.nn.functional.cross_entropy(
        logits, targets, reduction=reduction
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    mesh = parallel.device_mesh(torch.device("cpu"), world)

    def wrapped(layers: int, width: int):
        model = build(layers, width)
        if case["strategy"] == "ddp":
            return model, DDP(model), build_optimizer(model, lr=1e-4, weight_decay=0.01)
        if case["strategy"] == "fsdp+ckpt":
            parallel.checkpoint_blocks(model)
        parallel.shard(model, mesh)
        return model, model, build_optimizer(model, lr=1e-4, weight_decay=0.01)

    def train(model, train_model, optimizer, steps: int, inputs: list) -> None:
        for _ in range(steps):
            forward_backward(train_model, inputs, loss_fn, scaler, None, world)
            optimizer_step(model, optimizer, scaler, clip_grad=1.0)

    # A throwaway model first: what the first update sets up once (thread pools, the autograd
    # engine, gloo's buffers, ~200 MB) is not the model's memory.
    train(*wrapped(1, 32), 1, [batch(2, 16, seed=rank)])
    gc.collect()
    before = _rss("VmRSS")
    model, train_model, optimizer = wrapped(case["layers"], case["width"])
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here: training, not building
        f.write("5")
    train(model, train_model, optimizer, case["steps"], micro)
    peak = _rss("VmHWM") - before
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak": peak}))
    dist.destroy_process_group()


def measure(case: dict, world: int) -> float:
    import torch.multiprocessing as mp

    from helm.distributed import free_port

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc as each rank starts

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, free_port(), case, out), nprocs=world,
                           start_method="spawn")  # fmt: skip
        return max(json.loads(p.read_text())["peak"] for p in Path(out).glob("rank*.json"))


# The largest model that fits -------------------------------------------------------------------


def largest(strategy: str, gpus: int, memory: float, tokens: int, per_token_layer: float) -> dict:
    """The largest GPT-2-shaped model (d_ff = 4 D, L = D / 128, vocabulary 72) whose predicted
    memory at ``tokens`` tokens per GPU (bf16) fits in ``memory`` bytes."""
    best = None
    for width in range(256, 65536, 128):
        L = width // 128
        P_block = 12 * width * width + 13 * width
        P_root = 2 * 72 * width + 2 * width
        P = L * P_block + P_root
        A = tokens * L * per_token_layer * width
        A_ckpt = tokens * L * width * 2  # each block's input, bf16
        need = predict(strategy, P, P_root, P_block, gpus, A, A_ckpt, A / L, bf16=True)
        if need > memory:
            break
        best = {"params": P, "layers": L, "d_model": width, "predicted_gb": round(need / GB, 1)}
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["4x256", "8x512"], help="LAYERSxWIDTH")
    p.add_argument("--tokens", default="8x128", help="ROWSxLENGTH per rank")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--gpu-memory", type=float, default=80, help="GB of one GPU, for the table")
    p.add_argument("--gpu-tokens", type=int, default=8 * 1024, help="tokens per GPU, for the table")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_cpu.json"))
    args = p.parse_args(argv)
    rows, length = (int(x) for x in args.tokens.split("x"))
    results = []
    for size in args.sizes:
        layers, width = (int(x) for x in size.split("x"))
        P, P_root, P_block = unit_params(build(layers, width))
        act = activations(layers, width, rows, length)
        A, A_ckpt, A_block = act["fp32"], act["ckpt_fp32"], act["fp32"] / layers
        for strategy in STRATEGIES:
            case = dict(strategy=strategy, layers=layers, width=width, rows=rows, length=length,
                        steps=args.steps)  # fmt: skip
            predicted = predict(strategy, P, P_root, P_block, args.world, A, A_ckpt, A_block)
            measured = measure(case, args.world)
            row = {**case, "params": P, "activations_mb": round(A / MB, 1),
                   "predicted_mb": round(predicted / MB, 1), "measured_mb": round(measured / MB, 1),
                   "measured_over_predicted": round(measured / predicted, 2)}  # fmt: skip
            print(json.dumps(row), flush=True)
            results.append(row)
    per_token = {k: round(v / width, 2) for k, v in act.items() if k.startswith("per_token")}
    memory = args.gpu_memory * GB
    bf16 = per_token["per_token_layer_bf16_params"]
    table = [
        {"strategy": s, "gpus": n, **largest(s, n, memory, args.gpu_tokens, bf16)}
        for s in STRATEGIES
        for n in (1, 8)
    ]
    for row in table:
        print(json.dumps(row))
    report = {
        "device": cpu_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python bench/memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "world_size": args.world,
        "tokens_per_rank": rows * length,
        "activation_bytes_per_token_layer_per_d_model": per_token,
        "cases": results,
        "largest_gpt2_on_gpus": {
            "memory_gb": args.gpu_memory,
            "tokens_per_gpu": args.gpu_tokens,
            "rows": table,
        },  # fmt: skip
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
