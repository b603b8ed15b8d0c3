"""One benchmark worker per process: `python bench/workers.py ENGINE SPEC.json` prints one JSON result line.

Each engine trains the same model with the same LoRA config on the same token batches (read from the
spec's batch file), so tokens/s, peak RSS, time to first step and the first-step loss are comparable.
The first-step loss is a parity check: LoRA's B matrices start at zero, so before any update both
engines must compute the base model's loss on the identical batch.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_spec(path: str) -> dict:
    spec = json.loads(Path(path).read_text())
    spec["rows"] = [json.loads(line) for line in Path(spec["batches"]).read_text().splitlines()]
    return spec


def summarise(
    engine: str,
    step_seconds: list[float],
    losses: list[float],
    tokens_per_step: list[int],
    started: float,
    first_step_done: float,
    warmup: int,
) -> dict:
    measured = step_seconds[warmup:]
    median = sorted(measured)[len(measured) // 2]
    tokens = sum(tokens_per_step[warmup:])
    return {
        "engine": engine,
        "allocator": "jemalloc" if os.environ.get("TUNESMITH_ALLOCATOR_ACTIVE") else "system",
        "steps": len(step_seconds),
        "median_step_s": median,
        "tokens_per_s": tokens / sum(measured),
        "median_tokens_per_s": tokens_per_step[-1] / median,
        "peak_rss_mb": peak_rss_mb(),
        "time_to_first_step_s": first_step_done - started,
        "first_loss": losses[0],
        "losses": losses,
    }


def tunesmith_model(spec: dict):
    """The model `tunesmith train` builds for the spec's LoRA (r 16, alpha 32, all linear layers) and the compute
    dtype it picks for train.dtype (the spec's; auto by default: bf16 where this CPU multiplies it natively)."""
    import torch

    from tunesmith.config.schema import AdapterConfig, TrainConfig
    from tunesmith.models.precision import compute_dtype
    from tunesmith.train.build import build_model

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    dtype, _ = compute_dtype(TrainConfig(dtype=spec.get("dtype", "auto")), cpu)
    adapter = AdapterConfig(type=spec.get("tunesmith_adapter", spec["adapter"]), r=16, alpha=32, target="all-linear")
    return build_model(spec["model"], adapter, cpu, dtype=dtype), dtype


def dtype_name(dtype) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def run_tunesmith(spec: dict, recompute: bool | str = False, compiled: bool = False, split: bool = True) -> dict:
    import torch

    from tunesmith.config.schema import TrainConfig
    from tunesmith.data.packing import collate_rows, pack_rows
    from tunesmith.data.tokenize import TokenizedExample
    from tunesmith.train.build import compile_layers, enable_gradient_checkpointing, micro_batch_tokens
    from tunesmith.train.distributed import Runner
    from tunesmith.train.optim import build_optimizer, build_scheduler
    from tunesmith.train.step import train_step

    started = time.perf_counter()
    model, dtype = tunesmith_model(spec)
    cpu = torch.device("cpu")
    if recompute:  # train.gradient_checkpointing: true (the whole layer) or "selective" (its element-wise ops)
        enable_gradient_checkpointing(model, recompute)
    if compiled:  # train.compile
        compile_layers(model)
    examples = [TokenizedExample(row["input_ids"], [bool(m) for m in row["loss_mask"]]) for row in spec["rows"]]
    config = TrainConfig(lr=1e-4, warmup=0, schedule="constant", micro_batch_tokens="auto" if split else None)
    budget = micro_batch_tokens(config, cpu)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, spec["steps"])
    per_step = spec["batch"] * spec["grad_accum"]
    seconds, losses, tokens, first_done = [], [], [], 0.0
    for step in range(spec["steps"]):
        # The step's examples (the same ones the peer gets, in file order), packed into rows of at most
        # `seq` tokens as `tunesmith train` packs them, then run as `tunesmith train` runs them: in even
        # pieces of at most train.micro_batch_tokens (auto), or unsplit in `grad_accum` flat micro-batches
        # as the peer splits the step's examples (batch_size = rows / grad_accum).
        step_examples = examples[step * per_step : (step + 1) * per_step]
        rows = pack_rows([len(e) for e in step_examples], spec["seq"], list(range(len(step_examples))))
        micro = collate_rows(step_examples, rows, -(-len(rows) // spec["grad_accum"]), budget)
        result = train_step(Runner(model), micro, optimizer, scheduler, None, cpu, dtype)
        seconds.append(result.seconds)
        losses.append(result.loss)
        tokens.append(result.tokens)
        if step == 0:
            first_done = time.perf_counter()
    result = summarise(sys.argv[1], seconds, losses, tokens, started, first_done, spec["warmup"])
    return {**result, "dtype": dtype_name(dtype)}


def run_tunesmith_dpo(spec: dict) -> dict:
    """`method: dpo` with `dpo.reference: live`: the reference is the base with the adapter off, every step."""
    import torch

    from tunesmith.config.schema import TrainConfig
    from tunesmith.data.packing import collate, even_pieces
    from tunesmith.data.tokenize import TokenizedExample, TokenizedPair
    from tunesmith.registry import preference_losses
    from tunesmith.train.build import micro_batch_tokens
    from tunesmith.train.distributed import Runner
    from tunesmith.train.optim import build_optimizer, build_scheduler
    from tunesmith.train.preference import PreferenceObjective, adapter_off_logprobs
    from tunesmith.train.step import train_step

    started = time.perf_counter()
    model, dtype = tunesmith_model(spec)
    cpu = torch.device("cpu")
    pairs = [
        TokenizedPair(
            *(TokenizedExample(side["input_ids"], [bool(m) for m in side["loss_mask"]]) for side in row["sides"])
        )
        for row in spec["rows"]
    ]
    objective = PreferenceObjective(preference_losses.get("sigmoid"), 0.1, 0.0, adapter_off_logprobs)
    config = TrainConfig(lr=1e-4, warmup=0, schedule="constant")
    budget = micro_batch_tokens(config, cpu)  # both sides of a pair share a piece
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, spec["steps"])
    seconds, losses, tokens, first_done, chosen = [], [], [], 0.0, []
    for step in range(spec["steps"]):
        micro = [
            collate(piece) for piece in even_pieces(pairs[step * spec["batch"] : (step + 1) * spec["batch"]], budget)
        ]
        result = train_step(Runner(model), micro, optimizer, scheduler, None, cpu, dtype, objective)
        seconds.append(result.seconds)
        losses.append(result.loss)
        tokens.append(result.tokens)
        chosen.append(objective.take_stats()["logp_chosen"])
        if step == 0:
            first_done = time.perf_counter()
    return {
        **summarise(sys.argv[1], seconds, losses, tokens, started, first_done, spec["warmup"]),
        "first_logp_chosen": chosen[0],
        "dtype": dtype_name(dtype),
    }


def run_trl_dpo(spec: dict, best: bool) -> dict:
    """TRL's DPOTrainer + PEFT on the same pairs, as text (it tokenises them with the same chat template)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models import resolve_model

    started = time.perf_counter()
    directory = resolve_model(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    rows = [
        {
            "prompt": row["prompt"],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in spec["rows"]
    ]
    timings = {"seconds": [], "first_done": 0.0}
    options = dict(
        output_dir="/tmp/tunesmith-bench-trl",
        max_length=2 * spec["seq"],
        per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        bf16=False,
        seed=0,
        beta=0.1,
        loss_type=["sigmoid"],
    )
    if best:  # DPOConfig also turns gradient checkpointing on by default
        options.update(gradient_checkpointing=False)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(
        model=model,
        args=DPOConfig(**options),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[step_timer(timings)],
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    tokens = [
        sum(len(row["input_ids"]) for row in spec["rows"][i * spec["batch"] : (i + 1) * spec["batch"]])
        for i in range(spec["steps"])
    ]
    chosen = next((value for key, value in logged[0].items() if key.endswith("chosen") and "logps" in key), None)
    return {
        **summarise(
            "trl-best" if best else "trl",
            timings["seconds"],
            [entry["loss"] for entry in logged],
            tokens,
            started,
            timings["first_done"],
            spec["warmup"],
        ),
        "first_logp_chosen": chosen,
    }


def step_timer(timings: dict):
    """A TrainerCallback recording each optimizer step's wall time into `timings`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timings["seconds"].append(time.perf_counter() - self.began)
            if len(timings["seconds"]) == 1:
                timings["first_done"] = time.perf_counter()

    return StepTimer()


def run_trl(spec: dict, best: bool) -> dict:
    """TRL's SFTTrainer + PEFT in float32 (its CPU default), with its defaults or (`best`) its fastest settings."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    options = dict(bf16=False)
    # TRL's SFTConfig defaults to gradient_checkpointing=True (recompute in backward: less memory, slower).
    if best:  # the peer's fastest settings: no recompute, and padding-free batches where lengths vary
        options.update(gradient_checkpointing=False, **spec["peer_best"])
        if options.get("padding_free"):
            options.update(max_length=None)  # required by TRL with padding_free; rows are already <= seq tokens
    peft = (
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        if spec["adapter"] == "lora"
        else None
    )
    return sft_trainer_run("trl-best" if best else "trl", spec, model, tokenizer, options, peft, started)


def run_unsloth(spec: dict, four_bit: bool) -> dict:
    """Unsloth's CPU backend (unsloth_zoo/cpu) as its notebooks run it: FastLanguageModel with its defaults (dtype
    None: bf16 where this CPU has it natively, and its "unsloth" gradient checkpointing), 16-bit LoRA or (`four_bit`)
    its default load_in_4bit=True, full fine-tuning with full_finetuning=True, then TRL's SFTTrainer with the
    defaults its CPU backend installs (bf16 autocast where native, fused AdamW, chunked cross-entropy)."""
    import unsloth  # first, as Unsloth requires: it patches transformers and TRL as it imports
    from unsloth import FastLanguageModel

    started = time.perf_counter()
    full = spec["adapter"] == "full"
    model, tokenizer = FastLanguageModel.from_pretrained(
        spec["model_dir"], max_seq_length=spec["seq"], load_in_4bit=four_bit, full_finetuning=full
    )
    if not full:
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
    return {**sft_trainer_run(sys.argv[1], spec, model, tokenizer, {}, None, started), "version": unsloth.__version__}


def sft_trainer_run(name: str, spec: dict, model, tokenizer, options: dict, peft, started: float) -> dict:
    """TRL's SFTTrainer over the spec's rows, in file order, with the loss on each row's loss-mask tokens only."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"input_ids": row["input_ids"], "completion_mask": row["loss_mask"]} for row in spec["rows"]]
    timings = {"seconds": [], "first_done": 0.0}
    settings = dict(
        output_dir="/tmp/tunesmith-bench-trl",
        max_length=spec["seq"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["steps"],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        completion_only_loss=True,
        seed=0,
    )
    settings.update(options)  # the engine's own (dtype, trl-best's fastest settings)

    class InOrder(SFTTrainer):  # no shuffling, so every engine sees the same batches in the same order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(
        model=model,
        args=SFTConfig(**settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[step_timer(timings)],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    per_step = spec["batch"] * spec["grad_accum"]
    tokens = [
        sum(len(row["input_ids"]) for row in spec["rows"][i * per_step : (i + 1) * per_step])
        for i in range(spec["steps"])
    ]
    result = summarise(name, timings["seconds"], losses, tokens, started, timings["first_done"], spec["warmup"])
    return {**result, "dtype": "bfloat16" if trainer.args.bf16 else "float32"}  # the dtype its products run in


def main() -> None:
    engine, spec_path = sys.argv[1], sys.argv[2]
    if engine.startswith("tunesmith") and engine != "tunesmith-system-malloc":  # as `tunesmith train` runs
        from tunesmith.allocator import reexec_with_jemalloc

        reexec_with_jemalloc([sys.executable, *sys.argv])
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    spec = read_spec(spec_path)
    if spec.get("kind") == "dpo":
        result = (
            run_tunesmith_dpo(spec) if engine.startswith("tunesmith") else run_trl_dpo(spec, best=engine == "trl-best")
        )
    elif engine.startswith("tunesmith"):
        if engine == "tunesmith-qlora":  # QLoRA (4-bit NF4 base) against the scenario's LoRA engines
            spec["tunesmith_adapter"] = "qlora"
        if engine == "tunesmith-float32":  # train.dtype: float32, where auto would pick bf16
            spec["dtype"] = "float32"
        recompute = {"tunesmith-recompute": True, "tunesmith-selective": "selective"}.get(engine, False)
        result = run_tunesmith(
            spec, recompute=recompute, compiled=engine == "tunesmith-compile", split=engine != "tunesmith-unsplit"
        )
    elif engine.startswith("unsloth"):
        result = run_unsloth(spec, four_bit=engine == "unsloth-4bit")
    else:
        result = run_trl(spec, best=engine == "trl-best")
    print("BENCH_RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
