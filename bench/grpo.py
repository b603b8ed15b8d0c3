"""GRPO step time: tunesmith against TRL's GRPOTrainer, on the same prompts, group size and reply budget.

    python bench/grpo.py [--steps 8] [--prompts 4] [--group 4] [--max-new-tokens 128] [--output bench/grpo.json]

Both train LoRA r16 (alpha 32, all linear layers) on the default model, from the first gsm8k training prompts
(data/gsm8k/sft_train.jsonl), each step sampling --group replies to each of --prompts prompts at temperature 0.9,
with a KL weight of 0.04 to the base and the same reward: 1 when the last number of the reply is the row's answer,
a Python function run in-process by both. Each engine runs in its own process, alone; a step's time is its whole
step (sampling, scoring, the update), and the figure is the mean over steps 3..N (the first two warm up).

Engines: `tunesmith` (train.dtype auto: bf16 where the CPU has it), `trl` (GRPOTrainer with its defaults beside
those settings: gradient checkpointing on, its dapo loss) and `trl-no-checkpointing` (the same without gradient
checkpointing, its fastest on a model this small). TRL computes in bf16 where tunesmith does (`bf16=True`).
Needs the `bench` extra (trl). Not part of the test suite.
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "gsm8k" / "sft_train.jsonl"
MODEL = "smollm2-135m-instruct"
REWARD = '''
import re


def last_number(prompts=None, completions=None, answer=None, **kwargs):
    """1 when the reply's last number is the row's answer (the number after "####" in its worked solution)."""
    rewards = []
    for completion, expected in zip(completions, answer):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        numbers = re.findall(r"-?[\\d,]*\\.?\\d+", text)
        try:
            rewards.append(float(bool(numbers) and float(numbers[-1].replace(",", "")) == float(expected)))
        except ValueError:
            rewards.append(0.0)
    return rewards


def tunesmith_reward(prompt, reply, row):
    return last_number(completions=[reply], answer=[row["answer"]])[0]
'''


def prompt_rows(count: int) -> list[dict]:
    rows = []
    with open(DATA, encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            answer = row["output"].split("####")[-1].strip().replace(",", "")
            rows.append({"prompt": row["instruction"], "answer": answer})
            if len(rows) == count:
                break
    return rows


def run_tunesmith(args, work: Path) -> list[float]:
    rows = prompt_rows(args.prompts * args.steps)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (work / "rewards.py").write_text(REWARD, encoding="utf-8")
    output = work / "run"
    overrides = [
        f"model={MODEL}",
        "method=grpo",
        f"data.train={data}",
        "data.max_length=512",
        "adapter.type=lora",
        "adapter.r=16",
        "adapter.alpha=32",
        "adapter.target=all-linear",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.prompts}",
        "train.lr=5e-5",
        "train.schedule=constant",
        "train.warmup=0",
        "train.log_every=1",
        "train.save_every=1000",
        "train.progress=false",
        f"rl.max_new_tokens={args.max_new_tokens}",
        "rl.temperature=0.9",
        "rl.kl_coef=0.04",
        f"rl.reward_functions=[{work / 'rewards.py'}:tunesmith_reward]",
        f"grpo.num_generations={args.group}",
        f"output_dir={output}",
    ]
    subprocess.run([sys.executable, "-m", "tunesmith", "train", *overrides], check=True, cwd=work)
    times, seen = [], 0
    for line in (output / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "reward" in record and "tokens_per_s" in record:  # a step: its tokens over its whole time's rate
            times.append((record["tokens"] - seen) / record["tokens_per_s"])
            seen = record["tokens"]
    return times


TRL_SCRIPT = """
import json, sys, time
sys.path.insert(0, {work!r})
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from rewards import last_number

rows = json.load(open({rows!r}))
dataset = Dataset.from_list(
    [{{"prompt": [{{"role": "user", "content": r["prompt"]}}], "answer": r["answer"]}} for r in rows]
)
times, started = [], [None]


class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        started[0] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        times.append(time.perf_counter() - started[0])


config = GRPOConfig(
    output_dir={out!r},
    per_device_train_batch_size={completions},
    num_generations={group},
    max_completion_length={max_new_tokens},
    temperature=0.9,
    beta=0.04,
    learning_rate=5e-5,
    lr_scheduler_type="constant",
    max_steps={steps},
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    bf16={bf16},
    gradient_checkpointing={checkpointing},
    seed=0,
)
peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
model = AutoModelForCausalLM.from_pretrained({model!r}, torch_dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained({model!r})
trainer = GRPOTrainer(model=model, args=config, train_dataset=dataset, reward_funcs=last_number, peft_config=peft,
                      processing_class=tokenizer, callbacks=[Clock()])
trainer.train()
json.dump(times, open({times!r}, "w"))
"""


def run_trl(args, work: Path, checkpointing: bool, bf16: bool) -> list[float]:
    from tunesmith.models.loading import resolve_model

    rows = work / "rows.json"
    rows.write_text(json.dumps(prompt_rows(args.prompts * args.steps)))
    (work / "rewards.py").write_text(REWARD, encoding="utf-8")
    times = work / "times.json"
    script = TRL_SCRIPT.format(
        work=str(work),
        rows=str(rows),
        out=str(work / "trl"),
        completions=args.prompts * args.group,
        group=args.group,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        bf16=bf16,
        checkpointing=checkpointing,
        model=str(resolve_model(MODEL)),
        times=str(times),
    )
    (work / "trl_run.py").write_text(script, encoding="utf-8")
    subprocess.run([sys.executable, str(work / "trl_run.py")], check=True, cwd=work)
    return json.loads(times.read_text())


def describe() -> str:
    from tunesmith.hardware import describe as cpu

    return cpu()


def native_bf16() -> bool:
    from tunesmith.hardware import cpu_bf16

    return cpu_bf16().native


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--engines", default="tunesmith,trl,trl-no-checkpointing")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "grpo.json")
    args = parser.parse_args()
    bf16 = native_bf16()
    results = {}
    for engine in args.engines.split(","):
        with tempfile.TemporaryDirectory() as directory:
            work = Path(directory)
            began = time.perf_counter()
            if engine == "tunesmith":
                times = run_tunesmith(args, work)
            else:
                times = run_trl(args, work, checkpointing=engine == "trl", bf16=bf16)
            measured = times[2:]
            results[engine] = {
                "step_s": sum(measured) / len(measured),
                "steps": times,
                "wall_s": round(time.perf_counter() - began, 1),
            }
            print(f"{engine}: {results[engine]['step_s']:.2f} s/step", flush=True)
    base = results.get("tunesmith", {}).get("step_s")
    for engine, result in results.items():
        if base:
            result["speedup_of_tunesmith"] = round(result["step_s"] / base, 2)
    report = {
        "settings": vars(args) | {"output": str(args.output), "bf16": bf16},
        "cpu": describe(),
        "threads": os.cpu_count(),
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: (v["step_s"], v.get("speedup_of_tunesmith")) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
