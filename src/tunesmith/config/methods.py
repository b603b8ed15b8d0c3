"""The methods' own config sections: distillation, DPO, reward models, and RL (what ppo and grpo share, and each
one's own). config/schema.py puts them together with the general sections.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.sections import Section, registered


class DistillConfig(Section):
    teacher: str | None = Field(
        None,
        description="method: distill: the model to learn from: a built-in name, a local Hugging Face directory, "
        "a .gguf file, or a finished run directory (its adapter/ on its base, or its model/). It must use the "
        "student's tokenizer (the same vocabulary).",
    )
    loss: str = Field(
        "forward_kl",
        description="forward_kl: KL(teacher || student), covers every teacher mode; "
        "reverse_kl: KL(student || teacher), mode-seeking.",
    )
    temperature: float = Field(
        2.0,
        gt=0.0,
        description="Both distributions are softened as softmax(logits / T); the "
        "KD term is scaled by T^2 so its gradients keep their size (Hinton et al.).",
    )
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the KD term; the cross-entropy on the data's "
        "own targets gets 1 - alpha (1.0: pure distillation).",
    )
    cache: Literal["none", "disk"] = Field(
        "none",
        description="none: run the teacher on every batch (full vocabulary); disk: run it once over the "
        "training data and keep its top_k log-probabilities per target in RUN/teacher-cache/ (safetensors), reused "
        "across epochs and resumed runs.",
    )
    top_k: int = Field(
        64,
        ge=1,
        description="cache: disk: teacher tokens kept per target position. The KL is then "
        "taken over those k tokens, both distributions renormalised over them (an approximation that "
        "drops the teacher's tail; exact when k >= the vocabulary).",
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        return registered("distill_losses", value)


class DPOConfig(Section):
    loss: str = Field(
        "sigmoid",
        description="sigmoid: DPO (Rafailov et al.), with label_smoothing the conservative "
        "cDPO; robust: unbiased under label noise (Chowdhury et al.); ipo: squared loss toward a margin "
        "of 1/(2 beta) (Azar et al.); hinge: SLiC's hinge on the margin.",
    )
    beta: float = Field(
        0.1,
        gt=0.0,
        description="How far the policy may move from the reference: the temperature of "
        "the implicit reward beta * (log pi - log pi_ref); smaller lets it move further.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="sigmoid and robust: the assumed share of pairs whose labels are flipped."
    )
    reference: Literal["cached", "live"] = Field(
        "cached",
        description="cached: the reference log-probabilities (the model before training; an adapter's base "
        "with the adapter off) are computed once, before the first step, and kept in RUN/reference/ for resumes; "
        "live: computed on every batch with the adapter switched off (adapters only; no second copy of the model "
        "either way).",
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        return registered("preference_losses", value)


class RewardConfig(Section):
    margin: float = Field(
        0.0,
        ge=0.0,
        description="method: reward on pairs: the loss is -log sigmoid(r_chosen - "
        "r_rejected - margin), so the chosen reply must win by this much before its pair stops "
        "pulling (0: plain Bradley-Terry). Scored replies ({prompt, response, score}) are regressed "
        "on their scores, standardised with the training set's mean and standard deviation.",
    )


class ClassifyConfig(Section):
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="method: classify: the target puts this much probability evenly on every label and the rest "
        "on the true one (0: plain cross-entropy); it keeps a classifier from growing overconfident.",
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="method: classify: balanced weighs each example by n / (labels x its label's count) in the "
        "training data, so rare labels count as much as common ones (the weights average 1 over the data); none: "
        "every example counts once.",
    )
    calibrate: bool = Field(
        True,
        description="method: classify: fit a temperature on the validation set after training (it lowers the "
        "validation NLL; argmax labels never change) and save it with the model (calibration.json), so its "
        "probabilities mean what they say.",
    )
    abstain_precision: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="method: classify: abstain (label null) below the lowest confidence at which the validation set's "
        "answered examples are at least this accurate, e.g. 0.95; chosen after calibration and saved with it.",
    )
    out_of_scope: str | None = Field(
        None,
        description="method: classify: the training label that names out-of-scope messages (clinc150: oos). A "
        "confidence threshold chosen on the validation set (the one of best balanced accuracy there: the mean of "
        "in-scope accuracy and out-of-scope recall) sends unsure "
        "predictions to it too.",
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> "ClassifyConfig":
        if self.abstain_precision is not None and self.out_of_scope is not None:
            raise ValueError(
                "classify.abstain_precision and classify.out_of_scope each choose the confidence threshold; "
                "fix: set one of them"
            )
        if (self.abstain_precision is not None or self.out_of_scope is not None) and not self.calibrate:
            raise ValueError("a threshold is chosen on calibrated probabilities; fix: keep classify.calibrate: true")
        return self


class RewardFunctionConfig(Section):
    name: str = Field(
        description="A built-in reward function (exact_match | number_match | contains | length_penalty | "
        "matches_format) or your own, as module:function (an importable module) or path/to/file.py:function. "
        "It is called as f(prompt_messages, response_text, fields, **args) -> float, where fields are the "
        "row's other scalar fields (e.g. a reference answer)."
    )
    weight: float = Field(1.0, description="Its weight in the summed reward.")
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the function, e.g. {field: answer} or {text: Paris}."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value  # `rl.reward_functions=[number_match]`

    @field_validator("name")
    @classmethod
    def _known_function(cls, value: str) -> str:
        return value if ":" in value else registered("reward_functions", value)  # module:function is imported at setup


class RLConfig(Section):
    """What ppo and grpo share: where rewards come from, how replies are sampled, and the clipped update."""

    reward_model: str | None = Field(
        None,
        description="A reward model (a sequence classifier with one output, e.g. what "
        "method: reward trains) that scores each sampled reply in its conversation.",
    )
    reward_model_weight: float = Field(1.0, description="The reward model's weight in the summed reward.")
    reward_functions: list[RewardFunctionConfig] = Field(
        default_factory=list,
        description="Python reward functions, each a name or {name, weight, args}; the reward of "
        "a reply is the weighted sum of these and the reward model's score.",
    )
    max_new_tokens: int = Field(
        128, ge=1, description="Longest sampled reply in tokens; a prompt plus this must fit in data.max_length."
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Sampling temperature; the log-probabilities trained are the tempered policy's."
    )
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: draw from the smallest set of tokens that "
        "holds this much probability (1.0: from all).",
    )
    kl_coef: float = Field(
        0.05,
        ge=0.0,
        description="Weight of the KL divergence to the reference (the model before "
        "training; an adapter's base with the adapter off): grpo adds kl_coef * KL to the loss, ppo "
        "subtracts it from every token's reward. Full fine-tuning keeps a frozen copy of the starting "
        "model for it; 0 turns it off.",
    )
    clip_range: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="The probability ratio to the sampling-time policy is "
        "clipped to [1 - clip_range, 1 + clip_range] (PPO's clipped objective).",
    )
    tis_cap: float | None = Field(
        None,
        gt=0.0,
        description="Truncated importance sampling: each token's policy loss is multiplied by min(pi_old / "
        "pi_sampler, tis_cap), the trainer's sampling-time probability of the token over the one the sampler drew it "
        "with, to correct for a sampler whose numbers differ from the trainer's (another dtype, kernel or cache; see "
        "sample_logprob_diff in the log); e.g. 2. null: off.",
    )
    mismatch_warn: float | None = Field(
        0.05,
        ge=0.0,
        description="Warn (once per run, printed and logged as `warning`) when a step's sample_logprob_diff, the "
        "mean |log pi_sampler - log pi_trainer| over the sampled tokens, passes this (on the tests' tiny model "
        "float32 measures ~3e-7 and bfloat16 ~3e-3). null: never.",
    )
    update_epochs: int = Field(1, ge=1, description="Passes over each step's samples.")
    minibatches: int = Field(
        1,
        ge=1,
        description="Optimizer updates per pass: each step's samples are split into this "
        "many minibatches (train.grad_accum splits each one further, for memory).",
    )


class GRPOConfig(Section):
    num_generations: int = Field(
        4,
        ge=2,
        description="Replies sampled per prompt (a group); a reply's advantage is its reward relative to its group's.",
    )
    loss: str = Field(
        "grpo",
        description="The loss variant (docs/training.md): grpo: clipped per-token surrogate, mean over a minibatch's "
        "reply tokens; dapo: the same with clip-higher and the groups of equal rewards dropped (Yu et al. 2025); "
        "dr_grpo: advantages not divided by the group's deviation, each reply's token sum over rl.max_new_tokens "
        "(Liu et al. 2025); gspo: the reply's own ratio, clipped per reply, mean over replies (Zheng et al. 2025).",
    )
    scale_rewards: bool | None = Field(
        None,
        description="Divide each group's centred rewards by the group's standard deviation (false: centre only). "
        "null: the loss's own (false for dr_grpo, true for the others).",
    )
    clip_range_low: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="The ratio to the sampling-time policy is kept at least 1 - clip_range_low. null: the loss's "
        "own: 3e-4 for gspo (a reply's ratio moves far less than a token's), rl.clip_range for the others.",
    )
    clip_range_high: float | None = Field(
        None,
        gt=0.0,
        description="The ratio is kept at most 1 + clip_range_high. null: the loss's own: 0.28 for dapo "
        "(clip-higher: unlikely tokens may gain more), 4e-4 for gspo, the low clip for the others (symmetric).",
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        return registered("grpo_losses", value)


class PPOConfig(Section):
    gamma: float = Field(
        1.0, ge=0.0, le=1.0, description="Discount per token of the reward that comes at the reply's end."
    )
    lam: float = Field(
        0.95,
        ge=0.0,
        le=1.0,
        description="GAE lambda: 0 trusts the value head (low variance), 1 the sampled returns (no bias).",
    )
    value_coef: float = Field(0.1, ge=0.0, description="Weight of the value head's loss.")
    value_clip: float = Field(
        0.2,
        gt=0.0,
        description="A value prediction may move at most this far from its "
        "sampling-time value before its loss stops pulling it (clipped value loss).",
    )
    whiten_advantages: bool = Field(
        True, description="Normalise the step's advantages to mean 0, standard deviation 1."
    )


class RFTConfig(Section):
    grader: dict[str, Any] | None = Field(
        None,
        description="method rft: the grader whose score of each sampled reply is its reward, an object exactly as "
        "OpenAI's fine-tuning API takes it: string_check, text_similarity, python, score_model, label_model or "
        "multi (docs/graders.md). The prompt row is its `item` ({{ item.answer }}); the reply its sample. Added to "
        "rl.reward_functions and rl.reward_model where those are set too.",
    )


RL_METHODS = ("grpo", "ppo", "rft")
