"""Adapter types: how a loaded model is made trainable, saved and reloaded. Each is registered by name.

Every parameter-efficient type goes through PEFT, so what a run saves is PEFT's own format that plain
transformers + peft load. `full` and `freeze` train the model's own weights and save a full model.

| type           | trains                                                     | PEFT config            |
| lora           | low-rank updates B A on the target linears (rsLoRA option) | LoraConfig             |
| qlora          | LoRA on a base loaded in 4-bit NF4, double-quantised       | LoraConfig + bnb 4-bit |
| dora           | LoRA split into magnitude and direction                    | LoraConfig(use_dora)   |
| ia3            | learned rescaling vectors on keys, values and the FFN      | IA3Config              |
| llama_adapter  | gated adaption prompts in the top attention layers         | AdaptionPromptConfig   |
| prompt_tuning  | N virtual token embeddings before every example            | PromptTuningConfig     |
| prefix_tuning  | N learned keys and values in every attention layer         | PrefixTuningConfig     |
| full           | every weight                                               | -                      |
| freeze         | only the chosen layers / modules                           | -                      |
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.schema import AdapterConfig, Config
from tunesmith.errors import UserError
from tunesmith.models.families import is_checked
from tunesmith.models.fused_lora import fuse_gated_mlps, fuse_lora_layers
from tunesmith.models.heads import is_head
from tunesmith.registry import adapters
from tunesmith.rundir import read_weights


def is_sequence_classifier(model: torch.nn.Module) -> bool:
    """A transformers `*ForSequenceClassification` model (a reward model): its output head is new and must train."""
    return type(model).__name__.endswith("ForSequenceClassification")


def peft_task_type(model: torch.nn.Module) -> str:
    """SEQ_CLS for a sequence classifier (PEFT then trains its head in full and saves it with the adapter)."""
    return "SEQ_CLS" if is_sequence_classifier(model) else "CAUSAL_LM"


def lora_settings(config: AdapterConfig, task_type: str, model: torch.nn.Module | None = None, **extra: Any) -> Any:
    """PEFT's LoraConfig for the adapter section (`extra`: use_dora, base_model_name_or_path, ...); with the
    `model`, its fused expert weights join the targets (lora_targets)."""
    from peft import LoraConfig

    targets = lora_targets(model, config.target) if model is not None else {"target_modules": config.target}
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        use_rslora=config.rslora,
        bias="none",
        task_type=task_type,
        **targets,
        **extra,
    )


def expert_weights(model: torch.nn.Module) -> list[str]:
    """The model's fused expert weights as PEFT's target_parameters name them ("experts.gate_up_proj",
    "experts.down_proj"): the 3-D (expert, out, in) tensors of a mixture of experts (Qwen3-MoE, Mixtral, OLMoE in
    transformers 5), which are parameters, not linear layers."""
    found = set()
    for name, parameter in model.named_parameters():
        module, _, weight = name.rpartition(".")
        if parameter.ndim == 3 and module.rpartition(".")[2] == "experts":
            found.add(f"experts.{weight}")
    return sorted(found)


def lora_targets(model: torch.nn.Module, target: str | list[str]) -> dict[str, Any]:
    """PEFT's target_modules and target_parameters for `adapter.target`. The fused expert weights are targeted as
    parameters whenever the target is all-linear or names them ("experts", or a weight: "gate_up_proj", "down_proj"),
    so LoRA never skips the experts it was asked to train."""
    experts = expert_weights(model)
    if not experts:
        return {"target_modules": target}
    if target == "all-linear":
        return {"target_modules": target, "target_parameters": experts}
    names = [target] if isinstance(target, str) else list(target)
    named = {FUSED_EXPERT_NAMES.get(name, name) for name in names}
    chosen = experts if "experts" in names else [weight for weight in experts if weight.partition(".")[2] in named]
    linears = linear_names(model)
    expert_names = {"experts", *FUSED_EXPERT_NAMES, *(weight.partition(".")[2] for weight in experts)}
    modules = [name for name in names if name not in expert_names or name in linears]
    return {"target_modules": modules or None, "target_parameters": chosen}


# An expert projection's name before transformers 5 fused them (Llama-style and Mixtral's w1/w2/w3): the fused weight
FUSED_EXPERT_NAMES = {
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "w1": "gate_up_proj",
    "w3": "gate_up_proj",
    "w2": "down_proj",
}


def linear_names(model: torch.nn.Module) -> set[str]:
    """The last names of the model's linear layers (q_proj, down_proj, ...): what PEFT's target_modules match."""
    return {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _lora(model: torch.nn.Module, config: AdapterConfig, **extra: Any) -> torch.nn.Module:
    from peft import get_peft_model

    model = get_peft_model(model, lora_settings(config, peft_task_type(model), model, **extra))
    if is_checked(model.config):
        fuse_lora_layers(model)
    return model


def checkpoint_adapter(checkpoint: Path, config: Config) -> dict[str, bytes]:
    """A LoRA run's checkpoint as the adapter files PEFT saves (what serves the checkpoint as a model): its
    trainable weights, named as PEFT names them on disk (without the adapter's name, "default"), and the run's
    LoRA settings. An OSError when the checkpoint cannot be read (training pruned it meanwhile, say)."""
    import json

    from safetensors.torch import save as save_safetensors
    from torch.distributed.checkpoint.api import CheckpointException

    if config.adapter.type != "lora":
        raise ValueError(f"a {config.adapter.type} adapter; checkpoint models are LoRA adapters")
    # The base's structure (on the meta device: no weights are read) decides the targets as training did, its fused
    # expert weights included (lora_targets)
    settings = lora_settings(
        config.adapter, "CAUSAL_LM", structure_of(config.model), base_model_name_or_path=str(config.model)
    )
    try:
        weights = read_weights(checkpoint)
    except CheckpointException as error:  # a BaseException: a file gone while read
        raise OSError(f"{checkpoint} could not be read: {error}") from None
    weights = {name.replace(".default.", "."): tensor.contiguous() for name, tensor in weights.items()}
    return {
        "adapter_config.json": json.dumps(settings.to_dict(), default=list, sort_keys=True).encode(),
        "adapter_model.safetensors": save_safetensors(weights),
    }


def structure_of(model_spec: Any) -> torch.nn.Module:
    """The causal LM `model_spec` names, built on the meta device from its config: its modules and parameter shapes,
    no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.models.loading import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model_spec), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@adapters.register("lora", output="adapter")
def apply_lora(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    return _lora(model, config)


@adapters.register("qlora", output="adapter", quantization="nf4")
def apply_qlora(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    """LoRA over a base that load_model already quantised to 4-bit NF4 (the `quantization` info above)."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _lora(model, config)


@adapters.register("dora", output="adapter")
def apply_dora(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    try:
        return _lora(model, config, use_dora=True)
    except ValueError as error:
        if "ParamWrapper" not in str(error):
            raise
        raise UserError(
            f"adapter.type=dora: {model.config.model_type}'s experts are fused weight tensors, which PEFT's DoRA "
            "cannot adapt (it works on linear layers only); fix: set adapter.type: lora (LoRA trains the experts), "
            "or keep dora on the attention layers with adapter.target: [q_proj, k_proj, v_proj, o_proj]"
        ) from None


@adapters.register("ia3", output="adapter")
def apply_ia3(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    """IA3 scales keys, values and the FFN's inner activations; `all-linear` means ia3_targets below."""
    from peft import IA3Config, get_peft_model

    if config.target != "all-linear":
        names = [config.target] if isinstance(config.target, str) else config.target
    else:
        names = ia3_targets(model)
    feedforward = [name for name in names if name.rpartition(".")[2] in FEEDFORWARD_LINEARS]
    return get_peft_model(
        model, IA3Config(task_type="CAUSAL_LM", target_modules=names, feedforward_modules=feedforward)
    )


KEY_VALUE_LINEARS = ("k_proj", "v_proj", "qkv_proj")  # IA3 scales the keys and values: a fused qkv (Phi-3) whole
FEEDFORWARD_LINEARS = ("down_proj", "fc2", "w2")  # ... and the input of the FFN's output projection


def ia3_targets(model: torch.nn.Module) -> list[str]:
    """IA3's targets for `all-linear`: PEFT's own choice for the architecture where every module it names exists,
    else the model's key/value projections and its FFN's output projection by name (none in a mixture of experts,
    whose experts are fused tensors: IA3 scales keys and values there)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_CHOICE

    linears = linear_names(model)
    chosen = PEFT_CHOICE.get(model.config.model_type)
    if chosen and set(chosen) <= linears:
        return list(chosen)
    return [name for name in KEY_VALUE_LINEARS + FEEDFORWARD_LINEARS if name in linears]


@adapters.register("llama_adapter", output="adapter")
def apply_llama_adapter(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    """LLaMA-Adapter: `num_virtual_tokens` adaption prompts with zero-initialised gates in the top `layers` layers."""
    from peft import AdaptionPromptConfig, get_peft_model
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    if model.config.model_type not in TRANSFORMERS_MODEL_CONFIG:
        raise UserError(
            f"adapter.type=llama_adapter: PEFT's adaption prompts work on {', '.join(TRANSFORMERS_MODEL_CONFIG)} "
            f"models, and this one is {model.config.model_type}; fix: set adapter.type: prefix_tuning (learned keys "
            "and values in every layer) or lora"
        )
    layers = model.config.num_hidden_layers
    count = min(config.layers or layers, layers)
    return get_peft_model(
        model, AdaptionPromptConfig(adapter_len=config.num_virtual_tokens, adapter_layers=count, task_type="CAUSAL_LM")
    )


@adapters.register("prompt_tuning", output="adapter")
def apply_prompt_tuning(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    """A soft prompt of `num_virtual_tokens` embeddings, initialised from `init_text`'s tokens or at random."""
    from peft import PromptTuningConfig, get_peft_model

    options: dict[str, Any] = {"prompt_tuning_init": "RANDOM"}
    if config.init_text:
        options = {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": config.init_text,
            "tokenizer_name_or_path": str(model.name_or_path),
        }
    return get_peft_model(
        model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens, **options)
    )


@adapters.register("prefix_tuning", output="adapter")
def apply_prefix_tuning(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    if not is_checked(model.config):  # its keys and values reach each packed example through tunesmith's attention
        raise UserError(
            f"adapter.type=prefix_tuning: {model.config.model_type} is not in the architecture matrix "
            "(docs/models.md), so it trains without tunesmith's packed attention, which prefix tuning needs; "
            "fix: set adapter.type: prompt_tuning or lora"
        )
    return get_peft_model(
        model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens)
    )


@adapters.register("full", output="model")
def apply_full(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


@adapters.register("freeze", output="model")
def apply_freeze(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    """Train only the parameters whose names match `modules` (regular expressions) or lie in the top `layers`,
    and a sequence classifier's new head."""
    chosen = trainable_by_choice(model, config)
    if is_sequence_classifier(model):
        chosen |= {name for name, _ in model.named_parameters() if is_head(name)}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
    return model


def trainable_by_choice(model: torch.nn.Module, config: AdapterConfig) -> set[str]:
    names = [name for name, _ in model.named_parameters()]
    patterns = [re.compile(pattern) for pattern in config.modules]
    if config.layers:
        total = model.config.num_hidden_layers
        patterns.append(re.compile(rf"\.layers\.({'|'.join(str(i) for i in range(total - config.layers, total))})\."))
    chosen = {name for name in names if any(pattern.search(name) for pattern in patterns)}
    if not chosen:
        raise UserError(
            f"adapter.type=freeze: no parameter matches adapter.modules={config.modules} or "
            f"adapter.layers={config.layers}; fix: name modules by pattern (e.g. 'layers\\.29\\.', "
            f"'norm', 'lm_head') or set adapter.layers to the number of top layers to train; "
            f"parameters look like: {', '.join(names[:3])}"
        )
    return chosen


def apply_adapter(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    """The model ready to train: the adapter applied, and its SwiGLU MLPs on the path that saves half their
    activations (fused_lora.GatedDown)."""
    model = adapters.get(config.type, key="adapter.type")(model, config)
    if is_checked(model.config):
        fuse_gated_mlps(model)
    return model


def load_options(adapter_type: str) -> dict[str, Any]:
    """What load_model must do for this adapter type before it is applied (e.g. QLoRA's 4-bit base)."""
    info = adapters.info(adapter_type)
    return {"quantization": info["quantization"]} if "quantization" in info else {}


def output_name(adapter_type: str) -> str:
    """The run-directory folder the final weights go to: adapter/ or model/."""
    return adapters.info(adapter_type)["output"]


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    """Trainable and total parameters (4-bit weights counted as the parameters they stand for)."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel() * (
            2 if getattr(parameter, "quant_type", None) else 1
        )  # packed: two 4-bit values per byte
        total += count
        trainable += count if parameter.requires_grad else 0
    return {"trainable_parameters": trainable, "total_parameters": total, "trainable_share": trainable / max(total, 1)}


def has_soft_prompt(model: torch.nn.Module) -> bool:
    """Whether the model's active adapter is prompt learning (virtual tokens or prefixes, not weight changes)."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def soft_prompt(model: torch.nn.Module) -> tuple[str, Any] | None:
    """For prompt-learning adapters, what training must add around each example; None for every other model.

    ("prompt", (N, hidden) virtual token embeddings) for prompt tuning; ("prefix", [(key, value) per layer],
    each (1, kv_heads, N, head_dim)) for prefix tuning.
    """
    if not has_soft_prompt(model):
        return None
    config = model.active_peft_config
    if getattr(model.forward, "__func__", None) is not type(model).forward:
        return None  # inside PEFT's disable_adapter(), which swaps in the base model's forward: no soft prompt
    if config.peft_type.value == "PROMPT_TUNING":
        return "prompt", model.get_prompt(batch_size=1)[0]
    if config.peft_type.value == "PREFIX_TUNING":
        cache = model.get_prompt(batch_size=1)
        return "prefix", [(layer.keys, layer.values) for layer in cache.layers]
    raise UserError(
        f"adapter {config.peft_type.value} is not supported for training; fix: use prompt_tuning or prefix_tuning"
    )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: what a checkpoint must hold besides the frozen base."""
    return {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    missing = [name for name in parameters if parameters[name].requires_grad and name not in state]
    unexpected = [name for name in state if name not in parameters]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def save_final(
    model: torch.nn.Module,
    tokenizer: Any,
    directory: Path,
    state: dict[str, torch.Tensor] | None = None,
    base_model: str | None = None,
) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors) or a full HF model directory; `state`
    gives the weights when the model's own are sharded (gathered by train/session.py). `base_model` (the config's
    `model:`) is what the adapter names as its base, by its upstream id, not the cache path it was loaded from."""
    from tunesmith.models.model_card import name_upstream_base

    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(
        directory, safe_serialization=True, **({"state_dict": state} if state is not None else {})
    )
    if not hasattr(unwrapped, "peft_config"):
        tokenizer.save_pretrained(directory)
    elif base_model is not None:
        name_upstream_base(directory, base_model)


def load_adapter(model: torch.nn.Module, directory: Path, name: str = "default") -> torch.nn.Module:
    """Apply a saved PEFT adapter to a base model (inference); more can join it with model.load_adapter."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(directory), adapter_name=name, is_trainable=False)
    if is_checked(model.config):
        fuse_lora_layers(model)
    return model
