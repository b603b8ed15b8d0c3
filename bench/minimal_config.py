"""A user's minimal config, every other setting auto: does it give a model worth having? Writes
bench/minimal_config.json.

    python bench/minimal_config.py [--rows 1500]

The config names only the model, a training file and its format: ROWS banking77 training messages drawn at random
(seed 0) from the bundled whole training split. tunesmith resolves the rest (method classify, epochs, batch size,
learning rate: config/auto.py) and prints its reasons; the tuned model is then scored on the whole banking77 test
split (2,580 messages). Run it alone: about 20 minutes on 2 CPU cores. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "data" / "banking77" / "train_full.jsonl"
TEST = ROOT / "data" / "banking77" / "test_full.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "minimal-config")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "minimal_config.json")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    rows = TRAIN.read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(rows)
    train = args.runs / "train.jsonl"
    train.write_text("\n".join(rows[: args.rows]) + "\n", encoding="utf-8")
    config = args.runs / "config.yaml"
    run_dir = args.runs / "run"
    config.write_text(
        f"model: smollm2-135m-instruct\ndata: {{train: {train}, format: classification}}\noutput_dir: {run_dir}\n"
    )
    started = time.time()
    trained = subprocess.run(
        [sys.executable, "-m", "tunesmith", "train", str(config)],
        cwd=ROOT,
        check=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    train_s = time.time() - started
    subprocess.run(
        [sys.executable, "-m", "tunesmith", "eval", str(run_dir), "--data", str(TEST), "--max-examples", "2580"],
        cwd=ROOT,
        check=True,
    )
    scored = json.loads((run_dir / "eval.json").read_text())
    result = {
        "rows": args.rows,
        "config": config.read_text(),
        "resolved": [line for line in trained.stderr.splitlines() if line.startswith("auto: ")],
        "train_wall_s": round(train_s, 1),
        "wall_s": round(time.time() - started, 1),
        "accuracy": scored["metrics"]["accuracy"],
        "macro_f1": scored["metrics"]["macro_f1"],
        "n": scored["n"],
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
