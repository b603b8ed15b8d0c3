"""The architecture matrix: every model family a user brings, as a tiny random model built from transformers' own
config class, trained through tunesmith's paths and checked against the family's plain transformers model.

Each family's config turns on what sets it apart (sliding windows of 4 positions, soft-capped logits, q/k norms,
scaled logits and embeddings, experts), so an example of 9 tokens crosses every window. The reference is the
family's model with transformers' eager attention and PEFT's own LoRA layers: none of tunesmith's fused paths
(fused LoRA linears, GatedDown, the chunked attention kernel, the fused head losses, packing) runs there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import CHATML, CORPUS, build_tokenizer
from test_adapter_types import ALL_TYPES, adapted, peft_forward_loss
from test_adapter_types import examples as adapter_examples
from test_training import make_config, run

from tunesmith.config.schema import AdapterConfig, TrainConfig
from tunesmith.data.packing import collate, collate_rows
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.engine.forward import balance_loss, hidden_states, set_router_balance, training_paths
from tunesmith.errors import UserError
from tunesmith.models import attention, load_model
from tunesmith.models.adapters import load_options, save_final
from tunesmith.train.build import build_model
from tunesmith.train.distributed import Runner
from tunesmith.train.loss import token_loss_sum
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.step import train_step

WINDOW = 4  # sliding-window layers see their last 4 positions
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
QWEN_WINDOW = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)  # layer 1 slides
EXPERTS = dict(num_experts=4, num_experts_per_tok=2)
GEMMA2 = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=8)
GRANITE = dict(logits_scaling=8.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2)
GEMMA3_LAYERS = ["sliding_attention", "full_attention"]
# family: (config class, causal LM class, what the family's config turns on)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", QWEN_WINDOW),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(QWEN_WINDOW, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(GEMMA2, sliding_window=WINDOW, head_dim=8)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(sliding_window=WINDOW, head_dim=8, layer_types=GEMMA3_LAYERS, final_logit_softcapping=3.0),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", GRANITE),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layer_interval=2)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(EXPERTS, head_dim=8, decoder_sparse_step=1, moe_intermediate_size=32),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", EXPERTS),
}


# What each family takes (training_paths): GatedDown (a SwiGLU MLP), "window" (sliding-window layers), "eager"
# (soft-capped attention logits: the model's eager attention), "fused head" (no logit transform).
PATHS = {
    "llama": {"GatedDown", "fused head"},
    "qwen2": {"GatedDown", "window", "fused head"},
    "qwen3": {"GatedDown", "window", "fused head"},
    "gemma2": {"window", "eager"},
    "gemma3": {"window"},
    "mistral": {"GatedDown", "window", "fused head"},
    "phi3": {"window", "fused head"},
    "olmo2": {"GatedDown", "fused head"},
    "granite": {"GatedDown"},
    "smollm3": {"GatedDown", "fused head"},
    "qwen3_moe": {"fused head"},
    "mixtral": {"window", "fused head"},
    "olmoe": {"fused head"},
}
MOE_FAMILIES = {"qwen3_moe", "mixtral", "olmoe"}
# (family, adapter type) that tunesmith refuses with the fix: PEFT's adaption prompts know only Llama and Mistral,
# and its DoRA cannot adapt experts stored as fused tensors.
REFUSED = {(family, "llama_adapter") for family in FAMILIES if family not in ("llama", "mistral")}
REFUSED |= {(family, "dora") for family in MOE_FAMILIES}
EVERY_LAYER_SLIDES = {"mistral", "phi3", "mixtral"}  # no layer the chunked kernel takes 9-token examples on


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CHATML, "<|im_end|>")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory, tokenizer):
    return save_family(request.param, tmp_path_factory.mktemp(request.param, numbered=False), tokenizer)


def save_family(family: str, directory, tokenizer, **overrides):
    """The family's tiny model (2 layers, hidden 32, 4 query heads over 2 key heads), saved in `directory`;
    `overrides` change its config."""
    config_name, model_name, extra = FAMILIES[family]
    settings = dict(
        vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **SHAPE,
    )  # fmt: skip
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**settings, **extra, **overrides})
    getattr(transformers, model_name)(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def lora_model(directory) -> torch.nn.Module:
    """tunesmith's LoRA model of the family, every adapter weight random (B starts at zero, which differentiates
    nothing)."""
    model = build_model(str(directory), AdapterConfig(type="lora", r=4, target="all-linear"), torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.05, generator=generator)
    return model


def reference_model(directory, trained: torch.nn.Module) -> torch.nn.Module:
    """The family's plain transformers model (eager attention) under PEFT's LoRA, with `trained`'s adapter weights."""
    from peft import get_peft_model

    from tunesmith.models.adapters import lora_settings

    config = transformers.AutoConfig.from_pretrained(directory)
    base = getattr(transformers, FAMILIES_BY_TYPE[config.model_type]).from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    )
    reference = get_peft_model(base, lora_settings(AdapterConfig(type="lora", r=4, target="all-linear"), "CAUSAL_LM"))
    adapter = {name: p.detach() for name, p in trained.named_parameters() if p.requires_grad}
    missing = set(adapter) - {name for name, _ in reference.named_parameters()}
    assert not missing, f"tunesmith's adapter has weights PEFT's does not: {sorted(missing)[:4]}"
    reference.load_state_dict(adapter, strict=False)
    return reference


FAMILIES_BY_TYPE = {
    getattr(transformers, config_name).model_type: model_name for config_name, model_name, _ in FAMILIES.values()
}


def examples(vocab: int) -> list[TokenizedExample]:
    """Three examples of 9, 6 and 9 tokens, loss on all but the first 3 (9 crosses the window of 4)."""
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(5, vocab - 5, (n,), generator=generator).tolist() for n in (9, 6, 9)]
    return [TokenizedExample(row, [False] * 3 + [True] * (len(row) - 3)) for row in rows]


def per_example_loss(model: torch.nn.Module, batch: list[TokenizedExample]) -> torch.Tensor:
    """The summed cross-entropy of each example run alone through `model`'s own forward and logits."""
    total = torch.zeros(())
    for example in batch:
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        mask = torch.tensor(example.loss_mask[1:])
        total = total + F.cross_entropy(logits[mask], torch.tensor(example.input_ids[1:])[mask], reduction="sum")
    return total


@pytest.mark.parametrize("kernel", ["sdpa", "chunked"])
def test_packed_training_gives_the_plain_models_loss_and_gradients(family_dir, tokenizer, kernel, monkeypatch):
    """Packed into one row, through every fused path (with `chunked`, tunesmith's attention kernel on every layer it
    can take), the loss and LoRA gradients are the family's own model's, example by example."""
    calls = []
    if kernel == "chunked":
        monkeypatch.setattr(attention, "CHUNKED", {"min_key_heads": 1, "min_length": 1, "max_length": 10**6})
        kernel_function = attention.causal_attention
        monkeypatch.setattr(attention, "causal_attention", lambda *args: calls.append(1) or kernel_function(*args))
    model = lora_model(family_dir)
    if family_dir.name in MOE_FAMILIES:  # the router balance loss is not per example (test_moe_experts_train...)
        set_router_balance(model, 0.0)
    batch = examples(len(tokenizer))
    packed = token_loss_sum(model, collate_rows(batch, [[0, 1, 2]], 1)[0])
    packed.backward()
    family = family_dir.name
    assert bool(calls) == (kernel == "chunked" and family not in EVERY_LAYER_SLIDES and "eager" not in PATHS[family])
    reference = reference_model(family_dir, model)
    own = per_example_loss(reference, batch)
    own.backward()
    torch.testing.assert_close(packed, own, rtol=1e-5, atol=0)
    grads = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            expected = grads[name].grad  # float32 sums in another order: 1e-4 of the tensor's largest entry
            scale = expected.abs().max().item()
            torch.testing.assert_close(
                parameter.grad, expected, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}"
            )


def test_unpacked_forward_gives_the_plain_models_logits(family_dir, tokenizer):
    """One example alone (no packing, as scoring and generation run it): the plain model's logits."""
    model = lora_model(family_dir)
    ids = torch.tensor([examples(len(tokenizer))[0].input_ids])
    reference = reference_model(family_dir, model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_training_paths_name_each_fused_path_the_family_takes_and_why_one_is_off(family_dir):
    paths = training_paths(lora_model(family_dir))
    expected = PATHS[family_dir.name]
    assert paths["LoRA"].startswith("fused on") and paths["LoRA"].split()[2] == paths["LoRA"].split()[4]
    gated, mlps = paths["MLP"].split()[2], paths["MLP"].split()[4]
    assert (gated == mlps == "2") == ("GatedDown" in expected)
    assert ("off: " in paths["MLP"]) == ("GatedDown" not in expected)
    assert ("sliding window of 4" in paths["attention"]) == ("window" in expected)
    assert ("eager attention" in paths["attention"]) == ("eager" in expected)
    assert paths["head"].startswith("fused cross-entropy") == ("fused head" in expected)


@pytest.mark.parametrize("adapter_type", ALL_TYPES)
def test_every_adapter_type_trains_packs_exactly_and_reloads_in_plain_transformers_and_peft(
    family_dir, tmp_path, adapter_type
):
    """On each family, each adapter type: packed training's loss is the model's own forward's, example by example;
    two steps move exactly the trainable weights; the saved result reloads in plain transformers (+ peft) to the same
    logits."""
    from peft import PeftModel

    if (family_dir.name, adapter_type) in REFUSED:
        with pytest.raises(UserError, match=f"adapter.type={adapter_type}: .*; fix: "):
            adapted(family_dir, adapter_type)
        return
    model, tokenizer = adapted(family_dir, adapter_type)
    if family_dir.name in MOE_FAMILIES:  # the router balance loss is not per example (test_moe_experts_train...)
        set_router_balance(model, 0.0)
    with torch.no_grad():  # make the adapter act (several start as an identity)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    batch = adapter_examples()
    model.eval()
    with torch.no_grad():
        packed = token_loss_sum(model, collate(batch))
        alone = sum(peft_forward_loss(model, example) for example in batch)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=0)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(lr=1e-2, warmup=0, schedule="constant")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, 4)
    for _ in range(2):
        train_step(Runner(model), [collate(batch)], optimizer, scheduler, 1.0, torch.device("cpu"), None)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable, (sorted(trainable - moved)[:3], sorted(moved - trainable)[:3])
    save_final(model, tokenizer, tmp_path / "out")
    ids = torch.tensor([batch[0].input_ids])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        if adapter_type in ("full", "freeze"):
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        else:
            base, _ = load_model(str(family_dir), **load_options(adapter_type))
            reloaded = PeftModel.from_pretrained(base, tmp_path / "out")
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        if adapter_type in ("lora", "dora", "ia3"):  # what export --to merged writes: the update folded in
            merged = reloaded.merge_and_unload()
            torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_the_fix_for_dora_on_experts_works(tmp_path, tokenizer):
    """DoRA refused on fused experts names its fix: DoRA on the attention layers only, which then trains."""
    directory = save_family("qwen3_moe", tmp_path, tokenizer)
    config = AdapterConfig(type="dora", r=4, target=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = build_model(str(directory), config, torch.device("cpu"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("self_attn" in name for name in trainable)
    assert any("lora_magnitude_vector" in name for name in trainable)


def test_generation_through_the_engine_matches_transformers_generate(family_dir, tokenizer):
    """Greedy replies to a batch of two conversations (a shared system prompt the engine encodes once, prompts of
    different lengths padded between it and their own text) are the tokens the family's plain model generates for
    each conversation alone."""
    from tunesmith.engine.generation import Engine, Sampling

    model = lora_model(family_dir)
    reference = reference_model(family_dir, model).eval()
    engine = Engine(model, tokenizer, system_prompt=" ".join(CORPUS[:4]), has_adapter=True)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "hello"}],
    ]
    replies = engine.generate(conversations, Sampling(max_new_tokens=10))
    for conversation, reply in zip(conversations, replies):
        prompt = engine.chat.prompt_ids(conversation)
        with torch.no_grad():
            output = reference.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=engine.stop_ids()
            )
        assert reply == tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_experts_train_and_the_router_balance_loss_is_the_models_own(tmp_path, tokenizer, family):
    """LoRA with target all-linear reaches the fused expert weights (PEFT's target_parameters), training moves them,
    the start-up line counts expert, attention and router parameters, and the training loss carries the routers'
    load-balancing loss with the model's own weight, as its own forward computes it (here 0.5, to be seen)."""

    directory = save_family(family, tmp_path / family, tokenizer)
    model = lora_model(directory)
    set_router_balance(model, 0.5)
    paths = training_paths(model)
    assert paths["experts"].startswith("LoRA on 4 of 4 expert weight tensors")
    counts = dict(
        part.split(" ", 1)[::-1]
        for part in paths["experts"].split("trainable parameters: ")[1].split("; ")[0].split(", ")
    )
    assert all(int(counts[kind].split()[0].replace(",", "")) > 0 for kind in ("attention", "expert", "router"))
    assert paths["experts"].endswith("router balance loss x 0.5")
    example = examples(len(tokenizer))[0]
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor([[t if m else -100 for t, m in zip(example.input_ids, example.loss_mask)]])
    own = model(input_ids=ids, labels=labels, output_router_logits=True)
    targets = sum(example.loss_mask[1:])
    ours = token_loss_sum(model, collate([example]))
    torch.testing.assert_close(ours, own.loss * targets, rtol=1e-5, atol=0)
    assert own.aux_loss > 0
    set_router_balance(model, 0.0)
    assert token_loss_sum(model, collate([example])) < ours
    base = transformers.AutoModelForCausalLM.from_pretrained(directory)
    config = TrainConfig(lr=1e-2, warmup=0, schedule="constant")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, 4)
    for _ in range(2):
        train_step(Runner(model), [collate([example])], optimizer, scheduler, 1.0, torch.device("cpu"), None)
    merged = dict(model.merge_and_unload().named_parameters())
    fused = {name: weight for name, weight in base.named_parameters() if weight.ndim == 3}
    assert len(fused) == 4 and all(not torch.equal(merged[name], weight) for name, weight in fused.items())


def test_a_moe_training_run_prints_its_experts_and_takes_the_router_weight_from_the_config(
    tmp_path, tokenizer, chat_rows, capsys
):
    directory = save_family("olmoe", tmp_path / "olmoe", tokenizer)
    run(make_config(tmp_path, directory, chat_rows, "train.router_aux_loss_coef=0.25", "train.max_steps=2"))
    printed = capsys.readouterr().err
    assert "experts: LoRA on 4 of 4 expert weight tensors" in printed
    assert "router balance loss x 0.25" in printed


def test_an_architecture_outside_the_matrix_trains_exactly_on_the_unfused_paths_with_one_warning(tmp_path, tokenizer):
    """StableLM is not in the matrix: no fused path is taken, training says which are off, and packed training
    (transformers' own SDPA, rows masked by their restarting positions) still gives the plain model's loss."""
    from tunesmith.models.families import CHECKED

    config = transformers.StableLmConfig(
        vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **SHAPE,
    )  # fmt: skip
    assert config.model_type not in CHECKED
    torch.manual_seed(0)
    transformers.StableLmForCausalLM(config).save_pretrained(tmp_path / "stablelm")
    tokenizer.save_pretrained(tmp_path / "stablelm")
    model = lora_model(tmp_path / "stablelm")
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in module.__dict__ for module in model.modules())  # nothing fused
    paths = training_paths(model)
    assert "stablelm is not in the architecture matrix" in paths["warning"]
    assert paths["head"].startswith("Linear")
    batch = examples(len(tokenizer))
    packed = token_loss_sum(model, collate_rows(batch, [[0, 1, 2]], 1)[0])
    torch.testing.assert_close(packed, per_example_loss(model, batch), rtol=1e-5, atol=0)
    with pytest.raises(UserError, match="prefix_tuning: stablelm is not in the architecture matrix .* fix:"):
        build_model(str(tmp_path / "stablelm"), AdapterConfig(type="prefix_tuning"), torch.device("cpu"))


def test_the_matrix_is_the_checked_list():
    from tunesmith.models.families import CHECKED

    assert {getattr(transformers, config).model_type for config, _, _ in FAMILIES.values()} == CHECKED


def test_a_moe_checkpoint_is_served_with_its_expert_adapters(tmp_path, tokenizer, chat_rows):
    """A checkpoint's adapter (what the service serves a checkpoint as) targets the experts the user named as training
    did: PEFT loads it onto the base to the same logits as the run's final adapter of the same step."""
    from peft import PeftModel

    from tunesmith.models.adapters import checkpoint_adapter
    from tunesmith.rundir import read_run_config

    directory = save_family("olmoe", tmp_path / "olmoe", tokenizer)
    overrides = ["adapter.target=[q_proj, experts]", "train.max_steps=2", "train.save_every=2", "train.lr=0.05"]
    run(make_config(tmp_path, directory, chat_rows, *overrides))
    config = read_run_config(tmp_path / "run")
    files = checkpoint_adapter(tmp_path / "run" / "checkpoints" / "step-2", config)
    assert '"target_parameters"' in files["adapter_config.json"].decode()
    (tmp_path / "served").mkdir()
    for name, data in files.items():
        (tmp_path / "served" / name).write_bytes(data)
    ids = torch.tensor([examples(len(tokenizer))[0].input_ids])
    logits = []
    for adapter in ("served", "run/adapter"):
        base, _ = load_model(str(directory))
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, tmp_path / adapter).eval()(input_ids=ids).logits)
    base, _ = load_model(str(directory))
    assert not torch.allclose(logits[1], base(input_ids=ids).logits, atol=1e-3)  # the adapter changed something
    torch.testing.assert_close(logits[0], logits[1])


def test_dpo_on_a_moe_carries_the_router_balance_loss_once_per_pair(tmp_path, tokenizer):
    """The DPO loss of a mixture of experts adds its routers' balance loss (weighted, once per pair) over the pairs'
    tokens, as the token loss does; with the weight at 0 it is the plain DPO loss."""
    from tunesmith.data.tokenize import TokenizedPair
    from tunesmith.registry import preference_losses
    from tunesmith.train.preference import PreferenceObjective, adapter_off_logprobs

    model = lora_model(save_family("olmoe", tmp_path / "olmoe", tokenizer))
    chosen, rejected, _ = examples(len(tokenizer))
    batch = collate([TokenizedPair(chosen, rejected)])
    objective = PreferenceObjective(preference_losses.get("sigmoid"), 0.1, 0.0, adapter_off_logprobs)
    set_router_balance(model, 0.0)
    plain = objective(model, batch)
    set_router_balance(model, 0.5)
    routed: list = []
    hidden_states(model, batch, routed)
    torch.testing.assert_close(objective(model, batch), plain + 0.5 * balance_loss(model, routed))


def test_distillation_and_rl_on_a_moe_carry_the_router_balance_loss(tmp_path, tokenizer):
    """Distillation adds the routers' balance loss once per target, as the token loss does; the RL policy pass hands
    it to GRPO's and PPO's per-token losses, which add it to every reply token (their mean carries it once). With
    the weight at 0 each is its plain loss; a dense model has none."""
    from functools import partial
    from types import SimpleNamespace

    from tunesmith.config.schema import RLConfig
    from tunesmith.recipes.grpo import grpo_token_loss
    from tunesmith.registry import distill_losses, grpo_losses
    from tunesmith.train import policy
    from tunesmith.train.distill import Distiller, LiveTeacher

    directory = save_family("olmoe", tmp_path / "olmoe", tokenizer)
    model = lora_model(directory)
    batch = collate(examples(len(tokenizer))[:2])
    targets = int((batch.targets != -100).sum())
    routed: list = []
    hidden_states(model, batch, routed)
    distiller = Distiller(LiveTeacher(load_model(str(directory))[0]), distill_losses.get("forward_kl"), 2.0, 0.5)
    set_router_balance(model, 0.0)
    plain = distiller(model, batch)
    logprobs, _, none = policy.policy_outputs(model, batch, 1.0)
    assert none is None
    rollout = SimpleNamespace(
        logprobs=logprobs.detach(),
        advantages=torch.linspace(-1, 1, targets),
        ref_logprobs=None,
        sample_of_tokens=lambda: torch.zeros(targets, dtype=torch.long),
    )
    tokens = torch.arange(targets)
    token_loss = partial(grpo_token_loss, RLConfig(), grpo_losses.get("grpo"), (0.2, 0.2))
    plain_rl, figures = token_loss(rollout, model, batch, tokens)
    assert "router_balance" not in figures
    set_router_balance(model, 0.5)
    weighted = 0.5 * balance_loss(model, routed)
    torch.testing.assert_close(distiller(model, batch), plain + weighted * targets)
    _, _, balance = policy.policy_outputs(model, batch, 1.0)
    torch.testing.assert_close(balance, weighted)
    with_balance, figures = token_loss(rollout, model, batch, tokens)
    torch.testing.assert_close(with_balance, plain_rl + weighted)
    torch.testing.assert_close(figures["router_balance"], weighted.detach().expand(targets))
    dense = lora_model(save_family("llama", tmp_path / "llama", tokenizer))
    assert policy.policy_outputs(dense, batch, 1.0)[2] is None
