"""The typed config: `Config`, the whole of it, from its sections (config/sections.py: adapter, data, train, eval;
config/methods.py: distill, dpo, reward, rl, grpo, ppo), and its reference (`describe_fields`). config/loading.py
reads it from YAML and overrides.

Every field is documented once, in its section; the text feeds `tunesmith train --help-config` and the docs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from tunesmith import registry
from tunesmith.config.methods import (
    RL_METHODS,
    ClassifyConfig,
    DistillConfig,
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    RewardConfig,
    RewardFunctionConfig,
    RFTConfig,
    RLConfig,
)
from tunesmith.config.sections import (
    DEFAULT_MODEL,
    AdapterConfig,
    DataConfig,
    EarlyStoppingConfig,
    EvalConfig,
    RegularizationConfig,
    Section,
    TrainConfig,
    UnfreezeConfig,
    registered,
)
from tunesmith.errors import did_you_mean

__all__ = [  # the sections, importable from here as from the schema they make up
    "AdapterConfig",
    "Config",
    "DEFAULT_MODEL",
    "DPOConfig",
    "DataConfig",
    "DistillConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "GRPOConfig",
    "PPOConfig",
    "RFTConfig",
    "RLConfig",
    "RL_METHODS",
    "RegularizationConfig",
    "ClassifyConfig",
    "RewardConfig",
    "RewardFunctionConfig",
    "Section",
    "TrainConfig",
    "UnfreezeConfig",
    "as_yaml",
    "describe_fields",
    "registered",
]


class Config(Section):
    model: str = Field(
        DEFAULT_MODEL, description="A built-in model name, a local Hugging Face directory, or a .gguf file."
    )
    method: str = Field(
        "auto",
        description="The training recipe: auto | sft | pretrain | distill | dpo | reward | classify | ppo | grpo "
        "(auto: classify for {text, label} classification rows, else sft; classify: a sequence classifier over "
        "the data's labels; ppo and grpo: RL from rewards on prompts, see rl, ppo, grpo; rft: grpo whose reward is an "
        "OpenAI grader, see rft).",
    )
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    rft: RFTConfig = Field(default_factory=RFTConfig)
    output_dir: Path = Field(Path("runs/run"), description="The run directory.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return registered("methods", value)

    @model_validator(mode="after")
    def _distill_has_teacher(self) -> "Config":
        if self.method == "distill" and not self.distill.teacher:
            raise ValueError(
                "distill.teacher: method distill learns from a teacher model, and none is set; fix: set "
                "distill.teacher to a built-in model name, a model directory, a .gguf file or a finished "
                "run directory that uses the student's tokenizer (e.g. distill.teacher=runs/big-run)"
            )
        return self

    @model_validator(mode="after")
    def _rl_is_complete(self) -> "Config":
        """ppo, grpo and rft need a reward (rft: its grader) and room to reply; options of the supervised loop they
        lack are refused."""
        if self.rft.grader is not None and self.method != "rft":
            raise ValueError("rft.grader: only method rft grades its replies; fix: set method=rft, or remove it")
        if self.method not in RL_METHODS:
            return self
        problems = rft_grader_problems(self.rft.grader) if self.method == "rft" else []
        if not self.rl.reward_model and not self.rl.reward_functions and self.method != "rft":
            problems.append(
                f"rl.reward_functions: method {self.method} learns from rewards, and none is set; fix: set "
                f"rl.reward_functions (e.g. rl.reward_functions=[number_match]) and/or rl.reward_model "
                f"(e.g. rl.reward_model=runs/my-reward-model)"
            )
        if self.rl.max_new_tokens >= self.data.max_length:
            problems.append(
                f"rl.max_new_tokens: {self.rl.max_new_tokens} leaves no room for the prompt within "
                f"data.max_length={self.data.max_length}; fix: lower rl.max_new_tokens or raise data.max_length"
            )
        if self.data.truncation in ("truncate", "split"):
            problems.append(
                f"data.truncation: {self.data.truncation} would cut a prompt's end, where the model's turn "
                f"begins; fix: use error (report long prompts) or drop (skip them)"
            )
        unsupported = {
            "train.unfreeze": self.train.unfreeze is not None,
            "train.regularization": bool(self.train.regularization.l2_sp or self.train.regularization.l1_sp),
            "train.early_stopping": self.train.early_stopping.patience is not None
            or self.train.early_stopping.metric != "val_loss",
        }
        problems += [
            f"{key}: not supported by method {self.method} (it has no validation loss and samples its own "
            f"data); fix: remove it"
            for key, used in unsupported.items()
            if used
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _selection_metric_is_computed(self) -> "Config":
        """A metric other than val_loss can only choose the best checkpoint if the eval task computes it."""
        metric = self.train.early_stopping.metric
        if metric == "val_loss":
            return self
        names = registry.metric_names(self.eval.task)
        if metric not in names:
            raise ValueError(
                f"train.early_stopping.metric: '{metric}' is not a metric of eval.task={self.eval.task}"
                f"{did_you_mean(metric, names)}; choose val_loss or one of: {', '.join(names)}"
            )
        if self.eval.every is None or self.eval.data is None:
            raise ValueError(
                f"train.early_stopping.metric: '{metric}' is computed only during training with "
                f"eval.data and eval.every set; fix: set both (e.g. eval.every=20)"
            )
        return self


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every field, nested sections flattened: the config reference."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, f"{prefix}{name}."))
            continue
        default = "(required)" if field.is_required() else as_yaml(field.get_default(call_default_factory=True))
        rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows


def as_yaml(value: Any) -> str:
    """A default as a user would write it in the YAML config: runs/run, null, true, [0.9, 0.999], not repr's
    PosixPath('runs/run'), None, True."""
    import yaml
    from pydantic_core import to_jsonable_python

    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True, width=1 << 16, allow_unicode=True)
    return text.strip().removesuffix("\n...")  # a lone scalar is written as a document that ends in '...'


def rft_grader_problems(grader: dict[str, Any] | None) -> list[str]:
    """`key: message` lines for rft.grader's problems, found by its type's own check (through the registry, which
    imports the grader types when first asked)."""
    if grader is None:
        return [
            "rft.grader: method rft learns from a grader's scores, and none is set; fix: set rft.grader to a grader "
            "object, e.g. {type: string_check, name: exact, input: '{{ sample.output_text }}', reference: "
            "'{{ item.answer }}', operation: eq}"
        ]
    kind = grader.get("type")
    if kind not in registry.graders:
        known = registry.graders.names()
        return [
            f"rft.grader.type: {kind!r} is not a grader type{did_you_mean(str(kind), known)}; choose one of: "
            f"{', '.join(known)}"
        ]
    return [f"{problem.where}: {problem.message}" for problem in registry.graders.get(kind).check(grader, "rft.grader")]
