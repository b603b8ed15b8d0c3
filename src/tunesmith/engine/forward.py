"""Forward helpers shared by training, scoring and generation: the decoder's final hidden states (soft prompts
and packed examples included) and the output head applied only where a target is, in chunks, so the
(tokens, vocab) logits never exist all at once.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from tunesmith.data.packing import IGNORE, Batch
from tunesmith.models.adapters import soft_prompt
from tunesmith.models.families import is_checked
from tunesmith.models.fused_lora import gated_down_refusal, is_lora_linear
from tunesmith.models.heads import base_model

# Positions per output-head chunk: 256 x 49152 fp32 logits = 48 MiB. The chunk is alive at the step's peak (the end
# of the forward, with every activation saved), so it adds to peak RSS: 1024 rows cost 75 MB more on QLoRA fixed512
# and 60 MB more on mixed, with no speed gain (the products stay large; mixed ran 3.6% faster at 256, on AMX).
HEAD_CHUNK = 256


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the output head of a causal LM, through a PEFT wrapper if there is one. Where the
    model transforms its logits after the head, the head comes with that transform (TransformedHead)."""
    base = base_model(model)
    head = base.get_output_embeddings()
    config = getattr(base, "config", None)
    scale = 1.0 / (getattr(config, "logits_scaling", None) or 1.0) * (getattr(config, "logit_scale", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    if head is not None and (scale != 1.0 or softcap):
        return base.get_decoder(), TransformedHead(head, scale, softcap)
    return base.get_decoder(), head


def fused_head(model: torch.nn.Module, head: torch.nn.Module | None) -> bool:
    """Whether the fused head losses (HeadCrossEntropy, HeadTokenLogProbs) compute `model`'s loss from `head`'s
    weight: a plain Linear head (no logit transform, no adapter, no bias) of a family they are checked on."""
    return type(head) is torch.nn.Linear and head.bias is None and is_checked(model.config)


def training_paths(model: torch.nn.Module) -> dict[str, str]:
    """Which of tunesmith's fused training paths this model takes, and why a path is off where it is (a family's
    MLP, attention or head that a kernel does not compute exactly): printed when training starts."""
    modules = dict(model.named_modules())
    paths = {}
    if not is_checked(model.config):
        paths["warning"] = (
            f"{model.config.model_type} is not in the architecture matrix (docs/models.md), so tunesmith's fused "
            "paths are off for it: the fused LoRA linears, GatedDown, tunesmith's packed attention and the fused "
            "head losses; it trains on PEFT's own layers, transformers' SDPA (packed rows masked by their position "
            "ids) and the output head's logits"
        )
    lora = [module for module in modules.values() if is_lora_linear(module)]
    if lora:
        fused = sum("forward" in module.__dict__ for module in lora)
        paths["LoRA"] = f"fused on {fused} of {len(lora)} LoRA linears"
    mlps = [module for name, module in modules.items() if name.endswith(".mlp")]
    if mlps:
        refusals = sorted({gated_down_refusal(mlp) for mlp in mlps} - {None})
        gated = sum("forward" in mlp.__dict__ for mlp in mlps)
        paths["MLP"] = f"GatedDown on {gated} of {len(mlps)} MLPs" + "".join(f"; off: {why}" for why in refusals)
    experts = [(name, p) for name, p in model.named_parameters() if p.ndim == 3 and ".experts." in name]
    if experts:
        paths["experts"] = experts_path(model, len(experts))
    paths["attention"] = attention_path(model, attention_layers(model))
    _, head = decoder_and_head(model)
    if head is None:  # a sequence classifier (engine/classifier.py): its own head, on each example's last position
        paths["head"] = "the classifier's score head, on each example's last position"
    elif isinstance(head, TransformedHead):
        paths["head"] = f"{head.describe()}, per chunk; the fused head losses are off (they know no transform)"
    elif fused_head(model, head):
        paths["head"] = "fused cross-entropy (no logits kept for backward)"
    else:
        paths["head"] = f"{type(head).__name__}, per chunk of positions"
    return paths


def experts_path(model: torch.nn.Module, tensors: int) -> str:
    """A mixture of experts: how many of its `tensors` fused expert weights LoRA reaches, how many attention,
    expert and router parameters train, and the routers' balance loss."""
    wrapped = sum(
        type(m).__name__ == "ParamWrapper" and getattr(m.get_base_layer(), m.parameter_name).ndim == 3
        for m in model.modules()
    )
    kinds = {"attention": 0, "expert": 0, "router": 0, "other": 0}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            kind = (
                "expert"
                if ".experts." in name
                else "attention"
                if ".self_attn." in name
                else "router"
                if ".mlp.gate." in name or ".router." in name
                else "other"
            )
            kinds[kind] += parameter.numel()
    balance = router_balance(model)
    return (
        f"LoRA on {wrapped} of {tensors} expert weight tensors; trainable parameters: "
        + ", ".join(f"{count:,} {kind}" for kind, count in kinds.items() if count or kind != "other")
        + (f"; router balance loss x {balance[1]:g}" if balance else "; no router balance loss")
    )


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for name, module in model.named_modules() if name.endswith(".self_attn")]


def sliding_windows(model: torch.nn.Module) -> list[int]:
    """The sliding windows of the model's sliding-window attention layers (Mistral's on every layer, Gemma's and
    Qwen's on some), one per such layer; empty for a model without."""
    config = getattr(model, "config", None)
    windows = [
        getattr(layer, "sliding_window", getattr(config, "sliding_window", None)) for layer in attention_layers(model)
    ]
    return [window for window in windows if window]


def attention_path(model: torch.nn.Module, layers: list[torch.nn.Module]) -> str:
    """How packed attention runs on the model's attention `layers`: sliding windows, soft-capped logits."""
    config = getattr(model, "config", None)
    capped = [
        getattr(layer, "attn_logit_softcapping", getattr(config, "attn_logit_softcapping", None)) for layer in layers
    ]
    cap = max(filter(None, capped), default=None)
    kernel = "SDPA, or the chunked kernel where it is faster"
    if cap:
        kernel = f"the model's eager attention (it soft-caps attention logits at {cap:g}, which SDPA cannot)"
    notes = [f"packed, per example: {kernel}"]
    sliding = sliding_windows(model)
    if sliding:
        notes.append(
            f"a sliding window of {min(sliding)} on {len(sliding)} of {len(layers)} layers (a band mask for longer "
            "examples, which the chunked kernel does not take)"
        )
    return "; ".join(notes)


class TransformedHead(torch.nn.Module):
    """An output head followed by the transform its model applies to the logits: Granite divides them by
    `logits_scaling`, Cohere multiplies them by `logit_scale`, Gemma 2 and 3 soft-cap them (cap x tanh(logits /
    cap)). Every path that applies the head itself (the chunked losses, scoring, RL, distillation) then computes
    the model's own logits. It is not a plain Linear, so the fused head kernels, which know no transform, are not
    taken for such a model."""

    def __init__(self, head: torch.nn.Module, scale: float, softcap: float | None):
        super().__init__()
        self.head, self.scale, self.softcap = head, scale, softcap

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def describe(self) -> str:
        scale = f"logits x {self.scale:g}" if self.scale != 1.0 else ""
        softcap = f"logits soft-capped at {self.softcap:g}" if self.softcap else ""
        return "the model's " + " and ".join(filter(None, [scale, softcap]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def hidden_states(model: torch.nn.Module, batch: Batch, routed: list | None = None) -> torch.Tensor:
    """(1, T, H) final hidden states, attention causal within each example (models/attention.py).

    Soft prompts act per example, as PEFT applies them to a batch of one: prompt tuning puts its virtual
    tokens before each example (positions count them), prefix tuning gives every example's attention
    its learned keys and values (positions start after them).

    `routed`: a mixture-of-experts model appends its routers' logits (one tensor per layer) to it.
    """
    decoder, _ = decoder_and_head(model)
    soft = soft_prompt(model)
    if soft is None:
        output = decoder(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            segment_lengths=batch.segment_lengths,
            **({"output_router_logits": True} if routed is not None else {}),
        )
        if routed is not None:
            routed.extend(output.router_logits)
        return output.last_hidden_state
    kind, value = soft
    if kind == "prefix":  # positions count every virtual token, also where a sliding-window layer keeps fewer
        virtual = model.active_peft_config.num_virtual_tokens
        return decoder(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids + virtual,
            use_cache=False,
            segment_lengths=batch.segment_lengths,
            segment_prefix=value,
        ).last_hidden_state
    prompt = value.to(decoder.get_input_embeddings().weight.dtype)  # (N, H)
    virtual = prompt.shape[0]
    pieces, keep = [], []
    for offset, piece in zip(
        [0, *torch.tensor(batch.segment_lengths).cumsum(0).tolist()],
        decoder.get_input_embeddings()(batch.input_ids)[0].split(batch.segment_lengths),
    ):
        pieces += [prompt, piece]
        keep.append(torch.arange(piece.shape[0]) + offset + virtual * (len(keep) + 1))
    lengths = tuple(length + virtual for length in batch.segment_lengths)
    positions = torch.cat([torch.arange(length) for length in lengths])[None].to(batch.input_ids.device)
    hidden = decoder(
        inputs_embeds=torch.cat(pieces)[None], position_ids=positions, use_cache=False, segment_lengths=lengths
    ).last_hidden_state
    return hidden[:, torch.cat(keep).to(hidden.device)]


def router_balance(model: torch.nn.Module) -> tuple[Any, float] | None:
    """(the model's own load-balancing loss function, its weight) for a mixture-of-experts model whose routers'
    balance trains (train.router_aux_loss_coef, else the model's config), else None."""
    base = base_model(model)
    loss = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
    weight = getattr(base, "router_aux_loss_coef", None)  # the weight the model's own forward uses
    return (loss, weight) if loss is not None and weight else None


def set_router_balance(model: torch.nn.Module, weight: float) -> None:
    """Weigh a mixture of experts' router balance loss by `weight` (train.router_aux_loss_coef), in its own forward
    too; other models are left as they are."""
    base = base_model(model)
    if hasattr(base, "router_aux_loss_coef"):
        base.router_aux_loss_coef = base.config.router_aux_loss_coef = weight


def balance_loss(model: torch.nn.Module, routed: list[torch.Tensor]) -> torch.Tensor:
    """The routers' load-balancing loss over every token of a packed batch (no padding), as the model computes it."""
    loss, _ = router_balance(model)
    config = model.config
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    return loss(tuple(routed), experts, config.num_experts_per_tok, None)


def balanced_hidden_states(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden_states, and a mixture of experts' routers' load-balancing loss over the batch's tokens, weighted as
    training weighs it (router_balance): what every training objective adds once per unit it averages over. None
    for a model without routers, or with the weight at 0."""
    balance = router_balance(model)
    routed: list[torch.Tensor] | None = [] if balance is not None else None
    hidden = hidden_states(model, batch, routed)
    return hidden, balance[1] * balance_loss(model, routed) if balance is not None else None


def target_logits(model: torch.nn.Module, batch: Batch) -> Iterator[tuple[torch.Tensor, torch.Tensor, slice]]:
    """(logits, targets, positions) per chunk of the batch's target positions, in order.

    `positions` slices the target positions, so a caller can map a chunk back to its examples.
    """
    _, head = decoder_and_head(model)
    hidden = hidden_states(model, batch)
    keep = batch.targets != IGNORE
    yield from head_chunks(head, hidden[keep], batch.targets[keep])


def head_chunks(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor, slice]]:
    """(float32 logits, targets, positions) per chunk of HEAD_CHUNK rows of (N, H) `hidden` and (N,) `targets`."""
    for start in range(0, targets.shape[0], HEAD_CHUNK):
        chunk = slice(start, start + HEAD_CHUNK)
        yield head(hidden[chunk]).float(), targets[chunk], chunk


def per_example_logprob(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the sum of its target-token log-probabilities and its target count (scoring, not training)."""
    keep = batch.targets[0] != IGNORE
    owner = batch.example_index()[keep]
    examples = len(batch.segment_lengths)
    sums = torch.zeros(examples, dtype=torch.float32, device=keep.device)
    for logits, targets, chunk in target_logits(model, batch):
        sums.index_add_(0, owner[chunk], -F.cross_entropy(logits, targets, reduction="none"))
    return sums, torch.bincount(owner, minlength=examples)
