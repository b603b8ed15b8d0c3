"""The commands that use or ship a model: `models` (the built-in registry and its cache), `chat` and `generate`
(a model or a run answers), `export` (a run as a PEFT adapter, a merged model, GGUF, Ollama) and `adapters` (the
local adapter library). Like cli.py, they parse, call one function and print its result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunesmith.errors import UserError


def add_parsers(commands) -> None:
    models = commands.add_parser("models", help="the built-in model registry and its local cache")
    models.add_argument("action", choices=["list", "pull"])
    models.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    models.add_argument("--force", action="store_true", help="download and convert again")
    models.set_defaults(handler=cmd_models)

    for name, handler, help_text in (
        ("chat", cmd_chat, "talk to a model or a run (its adapter applied)"),
        ("generate", cmd_generate, "one reply per prompt"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("target", help="a run directory, a built-in model name, a model directory or a .gguf file")
        sub.add_argument("--max-new-tokens", type=int, default=256)
        sub.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        sub.add_argument("--top-p", type=float, default=1.0)
        sub.add_argument(
            "--system", help="a system message before the conversation (default: the run's data.system_prompt, if any)"
        )
        if name == "generate":
            sub.add_argument("--prompt", action="append", help="a prompt (repeatable); else one per stdin line")
            sub.add_argument("--jsonl", action="store_true", help="print {prompt, reply} JSON lines")
        sub.set_defaults(handler=handler)

    export = commands.add_parser("export", help="ship a run as a PEFT adapter, a merged model or a GGUF file")
    export.add_argument("run", type=Path, help="a run directory (with adapter/ or model/)")
    export.add_argument(
        "--to",
        required=True,
        help="peft (the adapter + tokenizer) | merged (one transformers "
        "directory) | gguf (one file for llama.cpp, LM Studio) | ollama "
        "(a directory: model.gguf + Modelfile for `ollama create`)",
    )
    export.add_argument(
        "--output", type=Path, required=True, help="the directory (peft, merged, ollama) or .gguf file to write"
    )
    export.add_argument(
        "--dtype",
        help="merged: float32 (default), bfloat16 or float16; gguf, ollama: float32 "
        "(default), float16 or q8_0 (q4_k_m: quantize a float32 export with "
        "llama.cpp's llama-quantize)",
    )
    export.add_argument("--force", action="store_true", help="replace an existing, non-empty output")
    export.set_defaults(handler=cmd_export)
    adapters = commands.add_parser("adapters", help="the local adapter library: list, show, add, merge, swap")
    adapters.add_argument("action", choices=["list", "show", "add", "merge", "swap"])
    adapters.add_argument("names", nargs="*", help="show NAME | add RUN_DIR | merge A B ... | swap A B ...")
    adapters.add_argument(
        "--name", help="add: the library name (default: the run directory's name); merge: the new adapter"
    )
    adapters.add_argument("--weights", help="merge: one weight per adapter, e.g. 0.7,0.3 (default: equal)")
    adapters.add_argument(
        "--combination",
        default="cat",
        help="merge: cat (exact weighted sum of updates), linear (average A and B), svd (sum truncated to a rank)",
    )
    adapters.add_argument("--prompt", action="append", help="swap: a prompt (repeatable)")
    adapters.add_argument("--max-new-tokens", type=int, default=64)
    adapters.add_argument("--temperature", type=float, default=0.0)
    adapters.add_argument("--top-p", type=float, default=1.0)
    adapters.add_argument("--force", action="store_true", help="add/merge: replace an entry of the same name")
    adapters.set_defaults(handler=cmd_adapters)


def cmd_models(args: argparse.Namespace) -> int:
    from tunesmith.models import catalog

    if args.action == "pull":
        print(catalog.pull(args.name, force=args.force))
        return 0
    for entry in catalog.list_models():
        state = f"cached at {entry['path']}" if entry["cached"] else "not downloaded (tunesmith models pull NAME)"
        print(f"{entry['name']:<24} {entry['description']}  [{entry['license']}]  {state}")
    return 0


def sampling_from(args: argparse.Namespace):
    from tunesmith.engine.generation import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)


def cmd_chat(args: argparse.Namespace) -> int:
    from tunesmith.engine.generation import Engine

    engine = Engine.load(args.target)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("type a message; an empty line or Ctrl-D ends the chat", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = ""
        for piece in engine.stream(messages, sampling_from(args)):
            print(piece, end="", flush=True)
            reply += piece
        print()
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunesmith.engine.generation import Engine

    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise UserError("no prompt given; fix: pass --prompt TEXT (repeatable) or pipe prompts, one per line")
    engine = Engine.load(args.target)
    system = [{"role": "system", "content": args.system}] if args.system else []
    conversations = [[*system, {"role": "user", "content": prompt}] for prompt in prompts]
    replies = engine.generate(conversations, sampling_from(args))
    for prompt, reply in zip(prompts, replies):
        print(json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False) if args.jsonl else reply)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tunesmith.models.export import export_run

    output = export_run(args.run, args.to, args.output, dtype=args.dtype, force=args.force)
    print(f"exported {args.run} as {args.to}: {output}")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from tunesmith.models import library

    if args.action == "list":
        for name in library.names():
            card = library.card(name)
            metrics = card.get("eval", {}).get("metrics", {})
            headline = next(iter(metrics.items()), None)
            figure = f"{headline[0]} {headline[1]['value']:.3f}" if headline else "not evaluated"
            kind = card["adapter"].get("type", "lora")
            print(f"{name:<24} {kind:<14} {card['method']:<8} base {card['base_model']}  {figure}")
        return 0
    if args.action == "show":
        print(json.dumps(library.card(one_name(args)), indent=1, ensure_ascii=False))
        return 0
    if args.action == "add":
        entry = library.add(Path(one_name(args)), name=args.name, force=args.force)
        print(f"added {entry['name']} ({entry['adapter'].get('type', 'lora')} on {entry['base_model']})")
        return 0
    if args.action == "merge":
        if not args.name:
            raise UserError("merge needs --name for the new adapter; fix: add --name MERGED")
        weights = parse_weights(args.weights, len(args.names))
        entry = library.merge(args.names, weights, args.name, args.combination, force=args.force)
        print(
            f"merged {', '.join(args.names)} with weights {weights} into {entry['name']} (rank {entry['adapter']['r']})"
        )
        return 0
    return swap(args)


def one_name(args: argparse.Namespace) -> str:
    if len(args.names) != 1:
        raise UserError(f"adapters {args.action} takes one name; got {len(args.names)}")
    return args.names[0]


def parse_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0 / count] * count
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise UserError(
            f"--weights '{text}' is not a comma-separated list of numbers; fix: e.g. --weights 0.7,0.3"
        ) from None


def swap(args: argparse.Namespace) -> int:
    """Load the base once with every named adapter, and answer each prompt with each adapter in turn."""
    import time

    from tunesmith.engine.generation import Engine

    if not args.names or not args.prompt:
        raise UserError("swap needs adapter names and --prompt; fix: tunesmith adapters swap A B --prompt 'hello'")
    started = time.perf_counter()
    engine = Engine.load_library(args.names)
    print(f"loaded the base and {len(args.names)} adapters in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    conversations = [[{"role": "user", "content": prompt}] for prompt in args.prompt]
    for name in args.names:
        began = time.perf_counter()
        engine.use(name)
        switched = time.perf_counter() - began
        for prompt, reply in zip(args.prompt, engine.generate(conversations, sampling_from(args))):
            print(
                json.dumps(
                    {"adapter": name, "prompt": prompt, "reply": reply, "switch_ms": round(switched * 1e3, 2)},
                    ensure_ascii=False,
                )
            )
    return 0
