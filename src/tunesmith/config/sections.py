"""The config's general sections: the adapter, the data, training (with its strategies) and evaluation, and the
base every section shares. config/methods.py holds the methods' own sections; config/schema.py the whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunesmith import registry
from tunesmith.errors import did_you_mean

DEFAULT_MODEL = "smollm2-135m-instruct"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def registered(registry_name: str, value: str) -> str:
    """`value` if a plugin of that name is registered, else a ValueError with a "did you mean" and the choices.

    A field validator (not a whole-config one), so a misspelt name is reported alongside every other problem.
    """
    plugins = getattr(registry, registry_name)
    if value not in plugins:
        raise ValueError(
            f"not a known {plugins.kind}{did_you_mean(value, plugins.names())}; "
            f"choose one of: {', '.join(plugins.names())}"
        )
    return value


class AdapterConfig(Section):
    type: str = Field(
        "lora",
        description="How the model is adapted: lora | qlora (LoRA on a 4-bit NF4 base) | dora | "
        "ia3 | llama_adapter | prompt_tuning | prefix_tuning | full (every weight) | freeze (chosen "
        "layers/modules). Parameter-efficient types save PEFT's format.",
    )
    r: int = Field(16, gt=0, description="LoRA/QLoRA/DoRA rank: the inner dimension of each low-rank update.")
    alpha: float = Field(
        32.0,
        gt=0,
        description="LoRA scaling numerator; the update is scaled by alpha / r (alpha / sqrt(r) with rslora).",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input path.")
    rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r), so higher ranks keep learning."
    )
    target: str | list[str] = Field(
        "all-linear",
        description="Modules that get LoRA/DoRA/IA3: 'all-linear', a list of module names (q_proj, ...), "
        "or one regular expression matched against full module names.",
    )
    num_virtual_tokens: int = Field(
        20,
        gt=0,
        description="prompt_tuning / prefix_tuning / llama_adapter: the number "
        "of virtual tokens (soft prompt length, prefix length, adaption prompt length).",
    )
    init_text: str | None = Field(
        None,
        description="prompt_tuning: initialise the soft prompt from this text's token embeddings (None: at random).",
    )
    layers: int | None = Field(
        None,
        gt=0,
        description="freeze: train the top N decoder layers; llama_adapter: adapt "
        "the top N attention layers (None: all of them).",
    )
    modules: list[str] = Field(
        default_factory=list,
        description="freeze: also train parameters whose names match any "
        "of these regular expressions (e.g. 'norm', 'lm_head', 'layers\\.29\\.mlp').",
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        return registered("adapters", value)

    @field_validator("modules")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"'{pattern}' is not a regular expression ({error}); fix: escape special characters")
        return value

    @model_validator(mode="after")
    def _freeze_names_something(self) -> "AdapterConfig":
        if self.type == "freeze" and not self.modules and not self.layers:
            raise ValueError(
                "adapter.type=freeze trains only what you choose, and nothing is chosen; fix: set "
                "adapter.layers (top N decoder layers) and/or adapter.modules (name patterns)"
            )
        return self


class DataConfig(Section):
    train: Path = Field(
        description="Training data, one example per row: .jsonl (or .json), .csv, .tsv (a header row "
        "names the columns) or .parquet; the extension picks the reader."
    )
    validation: Path | None = Field(None, description="Validation data file (any type train takes, same format).")
    val_fraction: float | None = Field(
        None, gt=0.0, lt=1.0, description="Hold out this fraction of train for validation when no file is given."
    )
    format: str = Field(
        "auto",
        description="The data format: auto (told from each file's fields or columns) or a "
        "registered format's name; every format, its fields and an example row are listed at the end "
        "of `tunesmith train --help-config`.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Your file's columns under the format's field "
        "names, field: column (e.g. {question: q, answer: a}), renamed before the format "
        "is told; other columns stay (reward functions and slices read them). Applies to "
        "data.train, data.validation and eval.data.",
    )
    max_length: int = Field(1024, gt=1, description="Longest example in tokens; packed rows hold at most this many.")
    packing: bool = Field(True, description="Pack several examples into each row (no attention across them).")
    truncation: Literal["error", "drop", "truncate", "split"] = Field(
        "error",
        description="An example longer than max_length: error (report it), drop (skip and count), "
        "truncate (keep the first max_length tokens; a classifier's input keeps its last, where it is read, in "
        "training and in use), split (text only: cut into max_length pieces).",
    )
    skip_bad_rows: bool = Field(False, description="Skip (and count) invalid rows instead of refusing the file.")
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens are trained: assistant turns only, or every token."
    )
    system_prompt: str | None = Field(None, description="System message added to examples that have none.")
    reasoning: Literal["keep", "drop", "mask"] = Field(
        "keep",
        description="Assistant turns' thoughts (a `reasoning` or `reasoning_content` field), rendered in the chat "
        "template's thinking block: keep (trained, like the reply), mask (in context, not trained) or drop "
        "(removed). A turn without thoughts is trained on its reply alone: an empty thinking block the template "
        "adds (Qwen3's <think></think>) stays context, so the model's thinking mode survives tuning.",
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return value if value == "auto" else registered("formats", value)

    @field_validator("columns")
    @classmethod
    def _columns_named(cls, value: dict[str, str]) -> dict[str, str]:
        for field_name, column in value.items():
            if not field_name.strip() or not column.strip():
                raise ValueError(
                    f"'{field_name}: {column}' names an empty field or column; fix: write field: column, "
                    f"e.g. {{question: q, answer: a}}"
                )
        return value

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if self.validation is not None and self.val_fraction is not None:
            raise ValueError("give data.validation or data.val_fraction, not both")
        return self


class EarlyStoppingConfig(Section):
    metric: str = Field(
        "val_loss",
        description="What 'best' means: val_loss, or a metric of eval.task (e.g. accuracy, macro_f1) "
        "computed every eval.every steps.",
    )
    patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement (None: never stop early)."
    )
    min_delta: float = Field(0.0, ge=0.0, description="An improvement smaller than this does not count.")


class UnfreezeConfig(Section):
    every: int = Field(ge=1, description="Unfreeze one more layer group (from the top down) every N steps or epochs.")
    unit: Literal["steps", "epochs"] = Field("steps", description="What `every` counts.")
    start: int = Field(
        1, ge=1, description="Groups trainable from the start: the output head and top layer are group 1."
    )


class RegularizationConfig(Section):
    l2_sp: float = Field(
        0.0,
        ge=0.0,
        description="Weight of sum (w - w_pretrained)^2 (L2-SP); for LoRA the "
        "squared norm of the update B A. Keeps the model near what it knew.",
    )
    l1_sp: float = Field(0.0, ge=0.0, description="Weight of sum |w - w_pretrained| (sparse updates).")


class TrainConfig(Section):
    epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Passes over the training data. auto: enough for about 200 optimizer steps (1 to 10), printed "
        "with its reason when training starts (train/auto.py).",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Train exactly this many optimizer steps, going through the data as many (partial) epochs as "
        "that takes (overrides epochs, as in Hugging Face's Trainer).",
    )
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Rows per micro-batch (packed rows when data.packing is on). auto: rows holding about 16 "
        "examples (fewer on small data: one per 50 examples); RL: 8 prompts.",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    micro_batch_tokens: int | Literal["auto"] | None = Field(
        "auto",
        description="Run each step's examples (its batch_size x grad_accum rows) in even pieces of at most "
        "this many tokens, whole examples each (a longer one runs alone); the gradients add up to the same update, "
        "so this sets activation memory, not the batch. auto: 1024 on a CPU, where pieces that size train as fast "
        "as whole steps in a fraction of the memory (BENCHMARKS.md), and no limit on a GPU; null: micro-batches of "
        "batch_size rows. RL recipes split their updates by grad_accum instead.",
    )
    lr: Annotated[float, Field(gt=0.0)] | Literal["auto"] = Field(
        "auto",
        description="Peak learning rate. auto: by adapter type (LoRA, QLoRA, DoRA 1e-3; IA3 3e-3; soft prompts "
        "3e-2; full and freeze 5e-5), a tenth of that for dpo, ppo and grpo.",
    )
    head_lr: Annotated[float, Field(gt=0.0)] | Literal["auto"] = Field(
        "auto",
        description="Peak learning rate of a sequence classifier's head (method classify's labels, reward's score), "
        "which starts from zero and learns from scratch while the body only adjusts. auto: train.lr, but at least "
        "1e-3, the rate a zero-initialised head learns at (full fine-tuning's 5e-5 leaves it nearly untrained; "
        "docs/classification.md).",
    )
    weight_decay: float = Field(
        0.0, ge=0.0, description="AdamW decoupled weight decay (toward zero; see regularization)."
    )
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    unfreeze: UnfreezeConfig | None = Field(
        None,
        description="Gradual unfreezing (ULMFiT): e.g. {every: 50}. "
        "None: everything trainable trains from the first step.",
    )
    layer_lr_decay: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Layer-wise learning-rate decay: each "
        "decoder layer's rate is the one above it times this (embeddings lowest).",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: str = Field("cosine", description="Learning-rate schedule after warmup: cosine | linear | constant.")
    warmup: float = Field(0.03, ge=0.0, description="Warmup: a fraction of all steps if < 1, else a step count.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm (None: no clipping).")
    seed: int = Field(0, description="Seed for initialisation, data order and dropout.")
    eval_every: int = Field(100, ge=1, description="Validation loss every N steps (and at the end).")
    save_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Keep the newest N step checkpoints (the best one is kept too).")
    log_every: int = Field(1, ge=1, description="Write a metrics.jsonl line every N steps.")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the newest complete checkpoint in output_dir; never: start fresh."
    )
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    max_bad_steps: int = Field(3, ge=1, description="Stop after this many non-finite losses in a row.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Compute dtype: auto is bfloat16 on a GPU that supports it and on a CPU that multiplies it "
        "natively (AMX, AVX512-BF16, Arm BF16: its flags, confirmed by a timing cached per machine), else float32; "
        "the run prints which and why. In bfloat16 the matrix products run in it and the frozen weight matrices are "
        "stored in it (a frozen base loads in it); trainable weights, the optimizer state, norms, softmax, losses "
        "and the residual stream stay float32. The run's eval and serving infer in the same dtype. float32: the "
        "exact path.",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (None: torch's default).")
    gradient_checkpointing: bool | Literal["selective"] = Field(
        False,
        description="Recompute activations in backward to save memory. true: keep only each decoder layer's "
        "input and recompute the layer (least memory, one more forward pass). selective: keep the outputs of the "
        "matrix products and attention, recompute the element-wise ops between them (norms, activations, rotary "
        "embeddings): about 40% less activation memory for little time. See BENCHMARKS.md.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (fused pointwise ops, fewer saved "
        "activations); about a minute once per process; needs a C compiler on CPU. See BENCHMARKS.md.",
    )
    router_aux_loss_coef: float | None = Field(
        None,
        ge=0,
        description="Mixture-of-experts models: the weight of the routers' load-balancing loss (Switch "
        "Transformer's, as the model's own forward computes it) added to the token loss, so that training does not "
        "collapse the routing onto a few experts. None: the model's own (its config's router_aux_loss_coef: 0.001 "
        "for Qwen3-MoE, 0.02 for Mixtral); 0: off. Other models: ignored.",
    )
    memory_check: bool = Field(
        True,
        description="Refuse, before loading the model, a run whose predicted peak memory (tunesmith plan) exceeds "
        "what this machine has free, naming the settings that would fit; false trains anyway.",
    )
    progress: bool = Field(True, description="Show a progress bar.")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun (or `tunesmith train --nproc N`): ddp keeps a whole copy of the model on "
        "each process; fsdp (FSDP2) shards weights, gradients and optimizer state over them, for models one device "
        "cannot hold. One process: ignored.",
    )
    cpu_offload: bool = Field(
        False,
        description="parallel: fsdp: keep the shards (and the optimizer step) in CPU "
        "memory, moving each layer to the GPU only while it runs. Slower; for the largest models.",
    )

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        return registered("schedules", value)

    @field_validator("epochs", "batch_size", "lr", mode="before")
    @classmethod
    def _auto_or_number(cls, value: Any, info: Any) -> Any:
        """auto, or a number: one message naming both choices, not one per member of the union."""
        if value == "auto":
            return value
        whole = info.field_name != "lr"
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (whole and not number.is_integer()):
            shape = "a whole number (e.g. 3)" if whole else "a number (e.g. 1e-3)"
            raise ValueError(f"must be {shape} or auto; not {value!r}")
        if whole and number < 1:
            raise ValueError(f"must be greater than or equal to 1 (or auto), not {value}")
        if not whole and number <= 0:
            raise ValueError(f"must be greater than 0 (or auto), not {value}")
        return int(number) if whole else number

    @field_validator("micro_batch_tokens", mode="before")
    @classmethod
    def _token_budget(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not str(value).strip().lstrip("-").isdigit():
            raise ValueError(f"must be a token count (e.g. 1024), auto, or null for no limit; not {value!r}")
        if int(value) < 1:
            raise ValueError(f"must be at least 1 token (or auto, or null for no limit), not {value}")
        return int(value)


class EvalConfig(Section):
    data: Path | None = Field(None, description="Evaluation data (JSONL) for `tunesmith eval RUN` and eval.every.")
    every: int | None = Field(
        None, ge=1, description="Also run the eval task during training every N steps (and at the end)."
    )
    task: str = Field(
        "classification", description="classification | exact_match | regression | perplexity | preference | generation"
    )
    baselines: list[str] = Field(default_factory=list, description="Baselines compared with the run: base, few-shot:K.")
    max_examples: int | None = Field(200, ge=1, description="Evaluate at most this many rows (the first N).")
    max_new_tokens: int = Field(32, ge=1, description="Generation budget per example.")
    batch_size: int = Field(16, ge=1, description="Examples generated together.")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        return registered("tasks", value)
