"""Rebuild the bundled data slices from the shared copy of the public datasets (deterministic).

    python data/make_slices.py ../shared/data
    python data/make_slices.py ../shared/data --hh-full runs/hh-full/train.jsonl   # all 1,603 hh-rlhf pairs, unbundled

banking77 (CC BY 4.0, PolyAI): both whole splits (train_full.jsonl, test_full.jsonl), and a stratified slice — the
first TRAIN_PER_LABEL training rows of each of the 77 intents, in the source order, and the first TEST_PER_LABEL
test rows of each intent.
"""

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

TRAIN_PER_LABEL, TEST_PER_LABEL = 24, 4
GSM8K_ROWS = 1000  # the first rows of the source training split
SGD_ROWS = {"train": 400, "dev": 80}  # the first dialogues of each source split
HH_ROWS = {"train": 800, "test": 400}  # the first pairs of each split of the shared copy
WEBQUESTIONS_ROWS = {"train": 1000, "test": 200}  # the first questions of each split of the shared copy


def stratified(rows: list[dict], per_label: int) -> list[dict]:
    taken: dict[str, int] = defaultdict(int)
    kept = []
    for row in rows:
        if taken[row["label"]] < per_label:
            taken[row["label"]] += 1
            kept.append({"text": row["text"], "label": row["label"]})
    return kept


def gsm8k(shared: Path) -> None:
    """gsm8k (MIT): instruction SFT rows, and the same problems as raw text documents for continued pre-training."""
    out = Path(__file__).parent / "gsm8k"
    out.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in (shared / "gsm8k" / "sft_train.jsonl").open(encoding="utf-8")][:GSM8K_ROWS]
    sft = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows]
    text = [{"text": f"Question: {r['instruction']}\nAnswer: {r['output']}"} for r in rows]
    for name, kept in (("sft_train", sft), ("text_train", text)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        print(f"gsm8k {name}: {len(kept)} rows")


def sgd_dialogues(shared: Path) -> None:
    """SGD (CC BY-SA 4.0, Google): multi-turn user/assistant dialogues, messages only."""
    out = Path(__file__).parent / "sgd_dialogues"
    out.mkdir(exist_ok=True)
    for split, count in SGD_ROWS.items():
        rows = [json.loads(line) for line in (shared / "sgd_dialogues" / f"{split}.jsonl").open(encoding="utf-8")][
            :count
        ]
        kept = [{"messages": r["messages"]} for r in rows]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        print(f"sgd_dialogues {split}: {len(kept)} rows")


def hh_pairs(shared: Path, split: str, count: int | None, path: Path) -> None:
    """hh-rlhf harmless-base (MIT, Anthropic): the first `count` pairs of a split (all with None), the prompt as a
    message list."""
    rows = [json.loads(line) for line in (shared / "hh_rlhf_harmless" / f"{split}.jsonl").open(encoding="utf-8")][
        :count
    ]
    kept = [
        {"id": r["id"], "prompt": r["prompt_messages"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    print(f"hh_rlhf_harmless {split}: {len(kept)} rows in {path}")


def hh_rlhf_harmless(shared: Path) -> None:
    for split, count in HH_ROWS.items():
        hh_pairs(shared, split, count, Path(__file__).parent / "hh_rlhf_harmless" / f"{split}.jsonl")


def redteam(shared: Path) -> None:
    """Attack prompt sets for `tunesmith redteam`: hh-rlhf harmless-base red-team openings (MIT, Anthropic), the
    first user turn of each test pair, each distinct text once; XSTest v2's 200 unsafe and 250 safe prompts
    (CC BY 4.0)."""
    out = Path(__file__).parent / "redteam"
    out.mkdir(exist_ok=True)
    pairs = [json.loads(line) for line in (shared / "hh_rlhf_harmless" / "test.jsonl").open(encoding="utf-8")]
    openings: dict[str, str] = {}
    for pair in pairs:
        openings.setdefault(pair["prompt_messages"][0]["content"].strip(), pair["id"])
    sets = {"hh_rlhf_harmless": [{"id": i, "prompt": text, "label": "unsafe"} for text, i in openings.items()]}
    prompts = [json.loads(line) for line in (shared / "xstest" / "prompts.jsonl").open(encoding="utf-8")]
    for label in ("unsafe", "safe"):
        sets[f"xstest_{label}"] = [
            {"id": r["id"], "prompt": r["prompt"], "label": label, "type": r["type"]}
            for r in prompts
            if r["label"] == label
        ]
    for name, kept in sets.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        print(f"redteam {name}: {len(kept)} rows")


def webquestions(shared: Path) -> None:
    """WebQuestions (CC BY 4.0, Berant et al.): question-answer pairs as a CSV file with a header row, the way a
    spreadsheet exports them, for the README's "your own data" path. `answer` is the first accepted answer."""
    out = Path(__file__).parent / "webquestions"
    out.mkdir(exist_ok=True)
    for split, count in WEBQUESTIONS_ROWS.items():
        rows = [json.loads(line) for line in (shared / "webquestions" / f"{split}.jsonl").open(encoding="utf-8")][
            :count
        ]
        with (out / f"{split}.csv").open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["question", "answer"])
            writer.writerows([r["question"], r["answer"]] for r in rows)
        print(f"webquestions {split}: {len(rows)} rows")


def main(shared: Path) -> None:
    webquestions(shared)
    redteam(shared)
    hh_rlhf_harmless(shared)
    gsm8k(shared)
    sgd_dialogues(shared)
    out = Path(__file__).parent / "banking77"
    for split, per_label in (("train", TRAIN_PER_LABEL), ("test", TEST_PER_LABEL)):
        rows = [json.loads(line) for line in (shared / "banking77" / f"{split}.jsonl").open(encoding="utf-8")]
        kept = stratified(rows, per_label)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        print(f"{split}: {len(kept)} rows")
        every = [{"text": row["text"], "label": row["label"]} for row in rows]  # the whole split, in source order
        (out / f"{split}_full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in every), encoding="utf-8")
        print(f"{split}_full: {len(every)} rows")


if __name__ == "__main__":
    if (
        "--hh-full" in sys.argv
    ):  # every shared hh-rlhf harmless training pair (1,603), not bundled: README's DPO evidence
        flag = sys.argv.index("--hh-full")
        hh_pairs(Path(sys.argv[1]), "train", None, Path(sys.argv[flag + 1]))
    else:
        main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
