"""The GPU check: one script for the first lent GPU, no network and no downloads, everything built in code.

    PYTHONPATH=src python bench/gpu_check.py                  # on one H100/H200, about 10 minutes
    PYTHONPATH=src python bench/gpu_check.py --device cpu     # the dry run (tiny sizes), in the default test suite

In order, it checks:
1. every fused op on the device in bf16 against its reference (the fused LoRA linear and GatedDown in a whole LoRA
   step, the chunked causal attention kernel, HeadCrossEntropy, DPO's HeadTokenLogProbs), each with its tolerance;
2. LoRA, QLoRA and full fine-tuning steps on randomly initialised 1B-class Llama and Qwen3 configs: tokens/s, peak
   memory and MFU against the device's measured bf16 matmul peak, beside TRL + PEFT on the same batches (when trl
   is importable; the GPU machine needs its wheel carried);
3. DDP on one device (torchrun, one process): the same loss as one plain process.

It prints a Markdown table for BENCHMARKS.md and writes it to --output. A check that cannot run here (QLoRA without
bitsandbytes, the peer without trl) is a row that says why, never a silent gap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself: run.py's rows and FLOP counts

# name: (transformers config class, model class, the size's config); "tiny" is the dry run's.
SIZES = {
    "1b": {
        "llama": dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        ),
        "qwen3": dict(
            hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        ),
    },
    "tiny": {
        "llama": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True,
        ),
        "qwen3": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512, tie_word_embeddings=True,
        ),
    },
}  # fmt: skip
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
# (rows per step, tokens per row) of each size's training steps
BATCH = {"1b": (8, 1024), "tiny": (2, 64)}
# Largest error of a bf16 fused op against its reference, relative to the reference's largest magnitude
BF16_TOLERANCE = 2e-2


def build_family(family: str, size: str, directory: Path) -> Path:
    """A randomly initialised model of the family at the size, saved with a word-level tokenizer over its vocab."""
    import transformers
    from tokenizers import Tokenizer, models

    config_name, model_name = CLASSES[family]
    settings = SIZES[size][family]
    config = getattr(transformers, config_name)(max_position_embeddings=4096, bos_token_id=None, **settings)
    config.eos_token_id = config.pad_token_id = 1
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).to(torch.bfloat16).save_pretrained(directory)
    vocabulary = {f"t{index}": index for index in range(settings["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="t0"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t1", pad_token="t1")
    tokenizer.save_pretrained(directory)
    return directory


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-12)).item()


def check_ops(device: torch.device, size: str, workdir: Path) -> list[dict]:
    """Each fused op in bf16 on `device` against its unfused reference: the largest relative error."""
    import torch.nn.functional as F

    from tunesmith.models.attention import causal_attention
    from tunesmith.train.loss import HeadCrossEntropy
    from tunesmith.train.preference import HeadTokenLogProbs

    rows = []
    generator = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, torch.bfloat16).requires_grad_()

    # The chunked causal attention kernel against SDPA (causal, grouped query heads)
    length = 512 if size == "1b" else 64
    q, k, v = rand(2, 8, length, 64), rand(2, 2, length, 64), rand(2, 2, length, 64)
    out = causal_attention(q, k, v, 64**-0.5, 96)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    grad = torch.randn_like(reference)
    ours_grads = torch.autograd.grad(out, (q, k, v), grad)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad)
    errors = [relative_error(out, reference), *map(relative_error, ours_grads, reference_grads)]
    rows.append({"op": "causal_attention (fwd, dq, dk, dv)", "error": max(errors)})

    # The fused head losses against the logits computed in full
    hidden, weight = rand(512, 256), rand(4096, 256, scale=0.05)
    targets = torch.randint(0, 4096, (512,), generator=generator).to(device)
    ours = HeadCrossEntropy.apply(hidden, weight, targets)
    reference = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    errors = [relative_error(ours, reference)]
    errors += map(
        relative_error, torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(reference, (hidden, weight))
    )
    rows.append({"op": "HeadCrossEntropy (loss, d hidden, d head)", "error": max(errors)})
    frozen = weight.detach()
    ours = HeadTokenLogProbs.apply(hidden, frozen, targets)
    reference = torch.log_softmax((hidden @ frozen.T).float(), -1).gather(1, targets[:, None])[:, 0]
    errors = [relative_error(ours, reference)]
    errors += map(relative_error, torch.autograd.grad(ours.sum(), hidden), torch.autograd.grad(reference.sum(), hidden))
    rows.append({"op": "HeadTokenLogProbs (log-probs, d hidden)", "error": max(errors)})

    # The fused LoRA linears and GatedDown: a whole LoRA step's loss and LoRA gradients, fused against PEFT's layers
    rows.append(lora_step_parity(device, size, workdir))
    for row in rows:
        row["tolerance"] = BF16_TOLERANCE
        row["ok"] = row["error"] <= BF16_TOLERANCE
    return rows


def lora_step_parity(device: torch.device, size: str, workdir: Path) -> dict:
    from unittest import mock

    from tunesmith.config.schema import AdapterConfig
    from tunesmith.data.packing import collate_rows
    from tunesmith.data.tokenize import TokenizedExample
    from tunesmith.models import adapters
    from tunesmith.models.precision import autocast
    from tunesmith.train.build import build_model
    from tunesmith.train.loss import token_loss_sum

    directory = build_family("llama", "tiny", workdir / "parity")
    adapter = AdapterConfig(type="lora", r=8, target="all-linear")
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(2, 500, (48,), generator=generator).tolist() for _ in range(3)]
    batch = collate_rows([TokenizedExample(row, [True] * len(row)) for row in rows], [[0, 1, 2]], 1)[0].to(device)
    results = []
    for fused in (True, False):
        with mock.patch.object(adapters, "is_checked", lambda config: fused):  # unfused: PEFT's own layers
            model = build_model(str(directory), adapter, device, dtype=torch.bfloat16)
        torch.manual_seed(2)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data.normal_(0, 0.02)
        with autocast(device, torch.bfloat16):
            loss = token_loss_sum(model, batch)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters() if p.requires_grad]))
    (loss, grads), (reference, reference_grads) = results
    errors = [relative_error(loss, reference), *map(relative_error, grads, reference_grads)]
    return {"op": "fused LoRA + GatedDown in a LoRA step (loss, LoRA grads)", "error": max(errors)}


def matmul_peak(device: torch.device, size: int) -> float:
    """The best bf16 GEMM rate on the device, in FLOP/s: the MFU ceiling."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_rows(size: str, vocab: int, steps: int) -> list[dict]:
    from run import fixed_length_rows

    per_step, length = BATCH[size]
    return fixed_length_rows(per_step * steps, length, vocab)


def tunesmith_steps(directory: Path, adapter_type: str, device: torch.device, rows: list[dict], steps: int) -> dict:
    """`steps` training steps as `tunesmith train` runs them (bf16 compute, packed rows); the time of all but the
    first two."""
    from tunesmith.config.schema import AdapterConfig, TrainConfig
    from tunesmith.data.packing import collate_rows
    from tunesmith.data.tokenize import TokenizedExample
    from tunesmith.models.adapters import load_options
    from tunesmith.train.build import build_model
    from tunesmith.train.distributed import Runner
    from tunesmith.train.optim import build_optimizer, build_scheduler
    from tunesmith.train.step import train_step

    if "quantization" in load_options(adapter_type):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {"skipped": "bitsandbytes is not installed here (carry its wheel)"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(str(directory), AdapterConfig(type=adapter_type, r=16, alpha=32), device, dtype=torch.bfloat16)
    config = TrainConfig(lr=1e-4, warmup=0, schedule="constant")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps)
    per_step = len(rows) // steps
    seconds, tokens, losses = [], 0, []
    for step in range(steps):
        chunk = rows[step * per_step : (step + 1) * per_step]
        examples = [TokenizedExample(row["input_ids"], [bool(m) for m in row["loss_mask"]]) for row in chunk]
        batch = collate_rows(examples, [[index] for index in range(len(examples))], len(examples))
        synchronize(device)
        started = time.perf_counter()
        result = train_step(Runner(model), batch, optimizer, scheduler, None, device, torch.bfloat16)
        synchronize(device)
        losses.append(result.loss)
        if step >= 2:
            seconds.append(time.perf_counter() - started)
            tokens += result.tokens
    return {"tokens_per_s": tokens / sum(seconds), "peak_mb": peak_memory_mb(device), "first_loss": losses[0]}


def peer_steps(directory: Path, adapter_type: str, device: torch.device, rows: list[dict], steps: int) -> dict:
    """TRL's SFTTrainer + PEFT in bf16 on the same rows (bench/workers.py's runner)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed here (carry its wheel)"}
    if adapter_type != "lora":
        return {"skipped": "the peer runs LoRA only here"}
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from workers import sft_trainer_run

    per_step, length = len(rows) // steps, len(rows[0]["input_ids"])
    spec = dict(rows=rows, seq=length, batch=per_step, grad_accum=1, steps=steps, warmup=2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    options = dict(bf16=device.type == "cuda", use_cpu=device.type != "cuda", gradient_checkpointing=False)
    started = time.perf_counter()
    result = sft_trainer_run("trl", spec, model, AutoTokenizer.from_pretrained(directory), options, peft, started)
    return {
        "tokens_per_s": result["tokens_per_s"],
        "peak_mb": peak_memory_mb(device),
        "first_loss": result["first_loss"],
    }


def ddp_check(directory: Path, device: torch.device) -> dict:
    """Two LoRA steps under torchrun with one process (DDP wraps the model) give one plain process's losses."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__]
    command += ["--ddp-worker", str(directory), "--device", device.type]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        return {"check": "DDP, one process", "ok": False, "detail": done.stderr.strip().splitlines()[-1:]}
    ddp = json.loads(done.stdout.strip().splitlines()[-1])
    plain = two_lora_steps(directory, device, distributed=False)
    ok = all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(ddp, plain))
    return {"check": "DDP, one process", "ok": ok, "detail": f"losses {ddp} against {plain}"}


def two_lora_steps(directory: Path, device: torch.device, distributed: bool) -> list[float]:
    from tunesmith.config.schema import AdapterConfig, TrainConfig
    from tunesmith.data.packing import collate_rows
    from tunesmith.data.tokenize import TokenizedExample
    from tunesmith.train import distributed as processes
    from tunesmith.train.build import build_model
    from tunesmith.train.optim import build_optimizer, build_scheduler
    from tunesmith.train.step import train_step

    world = processes.start(device) if distributed else processes.ONE_PROCESS
    torch.manual_seed(0)
    model = build_model(str(directory), AdapterConfig(type="lora", r=8, alpha=16), device)
    runner = processes.wrap(model, world, "ddp", None, False, []) if distributed else processes.Runner(model)
    config = TrainConfig(lr=1e-2, warmup=0, schedule="constant")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, 2)
    generator = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(2):
        rows = [torch.randint(2, 500, (32,), generator=generator).tolist() for _ in range(2)]
        batch = collate_rows([TokenizedExample(row, [True] * 32) for row in rows], [[0], [1]], 2)
        losses.append(train_step(runner, batch, optimizer, scheduler, None, device, None, world=world).loss)
    return losses


def markdown(device_name: str, ops: list[dict], steps: list[dict], ddp: dict, peak: float) -> str:
    lines = [f"GPU check on {device_name}; bf16 matmul peak {peak / 1e12:.1f} TFLOP/s (measured)", ""]
    lines += ["| fused op (bf16) | largest relative error | tolerance | ok |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {r['op']} | {r['error']:.2e} | {r['tolerance']:.0e} | {'yes' if r['ok'] else 'NO'} |" for r in ops]
    lines += ["", "| model | method | engine | tokens/s | peak memory MB | MFU | first loss |"]
    lines += ["| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in steps:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['engine']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['engine']} | {r['tokens_per_s']:,.0f} | {r['peak_mb']:,.0f} | "
                f"{r['mfu']:.1%} | {r['first_loss']:.4f} |"
            )
    lines += ["", f"{ddp['check']}: {'ok' if ddp['ok'] else 'FAILED'} ({ddp['detail']})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", choices=list(SIZES), help="default: 1b on cuda, tiny on cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--output", type=Path, default=Path("gpu_check.md"))
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.ddp_worker:
        print(json.dumps(two_lora_steps(args.ddp_worker, device, distributed=True)))
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; the dry run is --device cpu", file=sys.stderr)
        return 2
    from run import useful_flops_per_token

    size = args.size or ("1b" if device.type == "cuda" else "tiny")
    workdir = Path(tempfile.mkdtemp(prefix="tunesmith-gpu-check-"))
    ops = check_ops(device, size, workdir)
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 512)
    steps = []
    for family in CLASSES:
        directory = build_family(family, size, workdir / family)
        rows = training_rows(size, SIZES[size][family]["vocab_size"], args.steps)
        for method in ("lora", "qlora", "full"):
            for engine, run in (("tunesmith", tunesmith_steps), ("trl + peft", peer_steps)):
                if engine != "tunesmith" and method != "lora":
                    continue
                result = {"model": f"{family} ({size})", "method": method, "engine": engine}
                result.update(run(directory, method, device, rows, args.steps))
                if "tokens_per_s" in result:
                    flops = useful_flops_per_token(directory, rows, "full" if method == "full" else "lora")
                    result["mfu"] = result["tokens_per_s"] * flops / peak
                steps.append(result)
                print(json.dumps(result), flush=True)
    ddp = ddp_check(build_family("llama", "tiny", workdir / "ddp"), device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    report = markdown(name, ops, steps, ddp, peak)
    args.output.write_text(report, encoding="utf-8")
    print(report)
    return 0 if all(r["ok"] for r in ops) and ddp["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
