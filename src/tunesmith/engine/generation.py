"""The one generate engine: a model (with its adapter applied) and the chat template, KV-cached.

`chat`, `generate`, evaluation and (later) the service all generate through `Engine`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from tunesmith.data.formats import Example
from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.engine.forward import sliding_windows
from tunesmith.errors import UserError
from tunesmith.models import load_model
from tunesmith.models.adapters import has_soft_prompt, load_adapter, load_options
from tunesmith.models.precision import for_inference
from tunesmith.rundir import ADAPTER_DIR, CONFIG_FILE, MODEL_DIR, is_run_dir, read_run_config

Messages = list[dict[str, str]]
PREFIX_CACHE_MIN_TOKENS = 32  # below this, encoding the prefix with each row costs less than the cache copy


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


class Engine:
    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, system_prompt: str | None = None, has_adapter: bool = False
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat = ChatTokenizer(tokenizer, system_prompt=system_prompt)
        self.has_adapter = has_adapter
        self.device = next(model.parameters()).device
        # Encode a prompt prefix shared by a whole batch once (few-shot prompts); not with soft prompts,
        # which PEFT's generate puts before the whole prompt itself.
        self.prefix_caching = not has_soft_prompt(model)

    @classmethod
    def load(cls, target: str) -> "Engine":
        """A run directory (base model + its adapter, or its full model) or any model spec."""
        path = Path(target)
        if is_run_dir(path):
            run_config = read_run_config(path)
            if run_config.method == "reward":
                raise UserError(
                    f"{path} is a reward model: it rates replies and does not write them; fix: rate a "
                    f"file with `tunesmith score {path} --data FILE`, or evaluate it with `tunesmith eval`"
                )
            system_prompt = run_config.data.system_prompt
            if (path / ADAPTER_DIR).is_dir():  # the base as it trained (QLoRA: 4-bit), then the adapter
                model, tokenizer = load_model(run_config.model, **load_options(run_config.adapter.type))
                model = for_inference(load_adapter(model, path / ADAPTER_DIR), run_config.train)
                return cls(model, tokenizer, system_prompt, has_adapter=True)
            model, tokenizer = load_model(str(path / MODEL_DIR))
            return cls(for_inference(model, run_config.train), tokenizer, system_prompt)
        from tunesmith.models import library

        if not path.exists() and target in library.names():  # an adapter from the local library
            return cls.load_library([target])
        if path.is_dir() and (path / CONFIG_FILE).is_file():
            raise UserError(
                f"{path} is a run directory without adapter/ or model/: the run has not finished; "
                f"fix: resume it with `tunesmith train {path / CONFIG_FILE}`"
            )
        model, tokenizer = load_model(target)
        return cls(for_inference(model), tokenizer)

    @classmethod
    def load_library(cls, names: list[str]) -> "Engine":
        """One base model with several library adapters resident; `use(name)` switches between them."""
        from tunesmith.models import library

        cards = [library.card(name) for name in names]
        bases = {card["base_model"] for card in cards}
        if len(bases) > 1:
            raise UserError(
                f"adapters {', '.join(names)} need different base models ({', '.join(sorted(bases))}); "
                f"fix: load together only adapters of one base"
            )
        model, tokenizer = load_model(cards[0]["base_model"], **load_options(cards[0]["adapter"].get("type", "lora")))
        model = load_adapter(model, library.adapter_dir(names[0]), name=names[0])
        for name in names[1:]:
            model.load_adapter(str(library.adapter_dir(name)), adapter_name=name)
        engine = cls(for_inference(model), tokenizer, has_adapter=True)
        engine.use(names[0])
        return engine

    def use(self, adapter: str) -> None:
        """Switch the active adapter (one of those loaded) without touching the base weights."""
        loaded = list(getattr(self.model, "peft_config", {}))
        if adapter not in loaded:
            raise UserError(f"adapter '{adapter}' is not loaded in this engine; loaded: {', '.join(loaded) or 'none'}")
        self.model.set_adapter(adapter)
        self.prefix_caching = not has_soft_prompt(self.model)

    def base_model(self):
        """A context in which the engine generates with its adapter switched off (the base model)."""
        import contextlib

        return self.model.disable_adapter() if self.has_adapter else contextlib.nullcontext()

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # layers compiled for training (train.compile) decode eagerly
    def generate(
        self, conversations: list[Messages], sampling: Sampling = Sampling(), allowed: list[list[int]] | None = None
    ) -> list[str]:
        """Replies to several conversations at once (left-padded batch, KV cache).

        `allowed` restricts every reply to one of the given token sequences (e.g. the label set of a
        classification task, each ending in the end-of-turn token): a prefix trie says which tokens may
        come next, so a label costs only its own few tokens.
        """
        prompts = [self.chat.prompt_ids(messages) for messages in conversations]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        shared = common_prefix_length(prompts) if self.prefix_caching and len(prompts) > 1 else 0
        shared = shared if shared >= PREFIX_CACHE_MIN_TOKENS else 0
        new_tokens = sampling.max_new_tokens if allowed is None else max(map(len, allowed))
        windows = sliding_windows(self.model) if shared else []
        if windows and max(map(len, prompts)) + new_tokens > min(windows):
            shared = 0  # padding between the prefix and a row's own text would take room in a sliding window
        # Rows are [shared prefix][padding][own suffix]: positions come from the attention mask's cumsum,
        # so the padding in the middle shifts nothing, and the prefix is encoded once for the whole batch.
        suffix_width = max(len(prompt) - shared for prompt in prompts)
        width = shared + suffix_width
        rows = [p[:shared] + [pad] * (suffix_width - (len(p) - shared)) + p[shared:] for p in prompts]
        masks = [[1] * shared + [0] * (suffix_width - (len(p) - shared)) + [1] * (len(p) - shared) for p in prompts]
        input_ids = torch.tensor(rows, device=self.device)
        attention = torch.tensor(masks, device=self.device)
        kwargs = sampling.generate_kwargs()
        if shared:
            kwargs["cache"] = self.prefix_cache(input_ids[:1, :shared], len(prompts))
        if allowed is not None:
            kwargs["prefix_allowed_tokens_fn"] = trie_constraint(allowed, width, self.stop_ids()[0])
            kwargs["max_new_tokens"] = new_tokens
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention, pad_token_id=pad, eos_token_id=self.stop_ids(), **kwargs
        )
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]

    def prefix_cache(self, prefix: torch.Tensor, batch_size: int):
        """The KV cache of a (1, P) prefix, repeated for every row of the batch."""
        cache = self.model(input_ids=prefix, use_cache=True).cache  # transformers 5.25 renamed past_key_values
        cache.batch_repeat_interleave(batch_size)
        return cache

    def reply_ids(self, reply: str) -> list[int]:
        """The tokens a reply is generated as after the generation prompt, end-of-turn token included."""
        example = self.chat.tokenize_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": reply}])
        return [token for token, trained in zip(example.input_ids, example.loss_mask) if trained]

    @torch.no_grad()
    def loglikelihood(self, conversations: list[Messages | Example], batch_size: int = 16) -> list[tuple[float, int]]:
        """(sum of log-probabilities, token count) of the assistant turns of each conversation (every token of text).

        The tokens scored are exactly those training would train (assistant text and end-of-turn), so
        ranking replies by it matches what fine-tuning optimised.
        """
        examples = [
            self.chat(item) if isinstance(item, Example) else self.chat.tokenize_chat(item) for item in conversations
        ]
        return self.scored_loglikelihood(examples, batch_size)

    @torch.no_grad()
    def scored_loglikelihood(self, examples: list, batch_size: int = 16) -> list[tuple[float, int]]:
        """(sum of log-probabilities, count) of the tokens each tokenised example's loss mask marks."""
        from tunesmith.data.packing import collate
        from tunesmith.engine.forward import per_example_logprob

        scores: list[tuple[float, int]] = []
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size]).to(self.device)
            sums, counts = per_example_logprob(self.model, batch)
            scores += [(float(total), int(count)) for total, count in zip(sums, counts)]
        return scores

    @torch.no_grad()
    def next_token_logprobs(
        self, conversations: list[Messages], token_ids: list[int], reply_start: str = "", batch_size: int = 16
    ) -> torch.Tensor:
        """(n, len(token_ids)) log-probabilities of each given token as the next token of the reply to each
        conversation: after the generation prompt and `reply_start` (text the reply is taken to begin with).

        A verdict read from these costs one forward pass and no sampling (judges, classifiers). The rows are
        packed like `loglikelihood`'s, so no token is padding; the head runs only at each row's last position.
        """
        from tunesmith.data.packing import collate
        from tunesmith.data.tokenize import TokenizedExample
        from tunesmith.engine.forward import decoder_and_head, hidden_states

        _, head = decoder_and_head(self.model)
        start_ids = self.tokenizer(reply_start, add_special_tokens=False)["input_ids"] if reply_start else []
        prompts = [self.chat.prompt_ids(messages) + start_ids for messages in conversations]
        candidates = torch.tensor(token_ids, device=self.device)
        rows = []
        for start in range(0, len(prompts), batch_size):
            batch = collate([TokenizedExample(ids, [False] * len(ids)) for ids in prompts[start : start + batch_size]])
            batch = batch.to(self.device)
            last = torch.tensor(batch.segment_lengths, device=self.device).cumsum(0) - 1  # (B,) each row's last token
            logits = head(hidden_states(self.model, batch)[0, last]).float()  # (B, vocab)
            rows.append(torch.log_softmax(logits, dim=-1)[:, candidates].cpu())
        return torch.cat(rows) if rows else torch.empty(0, len(token_ids))

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")
    def generate_ids(self, prompt: list[int], sampling: Sampling = Sampling(), **options: Any) -> list[int]:
        """The tokens generated after one tokenised prompt, its end-of-turn token included when it stopped on
        one; `options` go to `model.generate` (a streamer, stopping criteria)."""
        input_ids = torch.tensor([prompt], device=self.device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            eos_token_id=self.stop_ids(),
            pad_token_id=self.tokenizer.eos_token_id,
            **sampling.generate_kwargs(),
            **options,
        )
        return output[0, len(prompt) :].tolist()

    def stream(self, messages: Messages, sampling: Sampling = Sampling()) -> Iterator[str]:
        """The reply to one conversation, piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(
            target=self.generate_ids,
            args=(self.chat.prompt_ids(messages), sampling),
            kwargs={"streamer": streamer},
            daemon=True,
        )
        worker.start()
        yield from streamer
        worker.join()

    def stop_ids(self) -> list[int]:
        return stop_token_ids(self.model, self.tokenizer)

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")
    def prompt_logprobs(self, ids: list[int], top_k: int = 0) -> list[tuple[float | None, dict[int, float]]]:
        """Per position i of a tokenised prompt: (log-probability of token i given the tokens before it, the
        `top_k` likeliest tokens there as {token id: log-probability}); position 0 has no context: (None, {}).
        One forward pass, under whatever adapter is active (OpenAI's `echo` with `logprobs`)."""
        input_ids = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, :-1]  # (T-1, V)
        scores = torch.log_softmax(logits.float(), dim=-1)
        chosen = scores.gather(1, input_ids[0, 1:, None])[:, 0].tolist()  # (T-1,)
        top = scores.topk(top_k, dim=-1) if top_k else None
        return [(None, {})] + [
            (logprob, dict(zip(top.indices[i].tolist(), top.values[i].tolist())) if top else {})
            for i, logprob in enumerate(chosen)
        ]


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """End-of-turn tokens: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each outside the prefix."""
    shortest = min(len(sequence) for sequence in sequences)
    length = 0
    while length < shortest - 1 and all(sequence[length] == sequences[0][length] for sequence in sequences):
        length += 1
    return length


def trie_constraint(sequences: list[list[int]], prompt_width: int, fallback: int):
    """A `prefix_allowed_tokens_fn` that keeps generation on a path of the trie of `sequences`."""
    trie: dict[int, dict] = {}
    for sequence in sequences:
        node = trie
        for token in sequence:
            node = node.setdefault(token, {})

    def allowed_next(batch_index: int, ids: torch.Tensor) -> list[int]:
        node = trie
        for token in ids[prompt_width:].tolist():
            node = node.get(token)
            if node is None:  # finished (only padding after the end token): let it stop
                return [fallback]
        return list(node) or [fallback]

    return allowed_next
