"""bfloat16 on a CPU: chosen only where the processor multiplies it natively (flags, confirmed by a cached timing),
frozen weight matrices stored in it, trainable weights and the residual stream kept in float32, the fused head
kernels computing in it as the unfused bf16 reference does, and a bf16 run that learns and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_training import make_config, metric_lines, run, straight_and_resumed

from tunesmith import hardware
from tunesmith.config.schema import TrainConfig
from tunesmith.engine.generation import Sampling
from tunesmith.models.precision import compute_dtype
from tunesmith.train.build import build_model
from tunesmith.train.loss import HeadCrossEntropy
from tunesmith.train.preference import HeadTokenLogProbs

X86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU part\t: 0xd4f\n"


def test_flags_are_read_from_x86_and_arm_cpuinfo():
    assert {"avx512_bf16", "amx_tile"} <= hardware.cpu_flags(X86)
    assert "bf16" in hardware.cpu_flags(ARM)
    assert hardware.cpu_flags("processor\t: 0\n") == set()


def test_a_benchmark_names_the_processor_and_its_bf16_instructions():
    x86 = X86.replace("model name", "cpu family\t: 6\nmodel\t\t: 143\nmodel name")
    assert hardware.describe(x86).startswith("Some CPU (cpu family 6, model 143), ")
    assert hardware.describe(x86).endswith(" cores, bf16: avx512_bf16")
    assert hardware.describe(ARM).startswith("Arm CPU part 0xd4f, ") and hardware.describe(ARM).endswith("bf16: bf16")
    assert hardware.describe("processor\t: 0\nflags\t: fpu sse\n").endswith("bf16: none")


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine whose flags and matmul timing the test sets, in a home with no cached timing; `timings` counts
    the timings run."""
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "bf16-home"))
    monkeypatch.delenv(hardware.OFF_SWITCH)
    state = {"flags": {"avx512_bf16"}, "speedup": 2.2, "timings": 0}

    def timed() -> float:
        state["timings"] += 1
        return state["speedup"]

    monkeypatch.setattr(hardware, "cpu_flags", lambda text=None: state["flags"])
    monkeypatch.setattr(hardware, "matmul_speedup", timed)
    return state


def test_a_cpu_without_bf16_flags_is_never_timed_or_chosen(machine):
    machine["flags"] = {"avx2", "fma"}
    support = hardware.cpu_bf16()
    assert not support.native and "no bf16 instructions" in support.reason and machine["timings"] == 0
    assert compute_dtype(TrainConfig(), torch.device("cpu")) == (None, f"auto: {support.reason}")


def test_emulated_bf16_slower_than_float32_is_refused_despite_its_flag(machine):
    machine["speedup"] = 0.6
    support = hardware.cpu_bf16()
    assert not support.native and "0.6x float32's speed" in support.reason
    assert compute_dtype(TrainConfig(), torch.device("cpu"))[0] is None


def test_native_bf16_is_chosen_and_its_timing_is_cached_per_machine(machine, monkeypatch):
    dtype, why = compute_dtype(TrainConfig(), torch.device("cpu"))
    assert dtype == torch.bfloat16 and "avx512_bf16" in why and "2.2x" in why and "(measured)" in why
    assert "(cached)" in hardware.cpu_bf16().reason and machine["timings"] == 1
    monkeypatch.setattr(hardware, "processor_name", lambda: "another processor")  # a changed machine: timed again
    assert hardware.cpu_bf16().native and machine["timings"] == 2
    assert compute_dtype(TrainConfig(dtype="float32"), torch.device("cpu")) == (None, "train.dtype=float32")
    assert machine["timings"] == 2, "an explicit dtype times nothing"


def test_tunesmith_cpu_bf16_0_keeps_auto_at_float32_without_timing_anything(machine, monkeypatch):
    monkeypatch.setenv(hardware.OFF_SWITCH, "0")
    assert compute_dtype(TrainConfig(), torch.device("cpu")) == (None, "auto: TUNESMITH_CPU_BF16=0")
    assert machine["timings"] == 0
    assert compute_dtype(TrainConfig(dtype="bfloat16"), torch.device("cpu"))[0] == torch.bfloat16  # asked for


def test_a_damaged_cache_is_measured_again(machine, tmp_path):
    cache = tmp_path / "bf16-home" / hardware.CACHE_FILE
    cache.parent.mkdir()
    cache.write_text("{not json")
    assert hardware.cpu_bf16().native and machine["timings"] == 1
    assert len(json.loads(cache.read_text())) == 1


def test_the_real_timing_compares_both_dtypes():
    assert hardware.matmul_speedup(repeats=2) > 0


@pytest.mark.parametrize("adapter, method", [("lora", "sft"), ("lora", "classify"), ("full", "sft")])
def test_frozen_matrices_go_bf16_while_trainable_weights_norms_and_the_residual_stay_float32(
    tmp_path, tiny_model, chat_rows, adapter, method
):
    config = make_config(tmp_path, tiny_model, chat_rows, f"adapter.type={adapter}", f"method={method}")
    model = build_model(
        config.model, config.adapter, torch.device("cpu"), 3 if method == "classify" else None, torch.bfloat16
    )
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.dtype == torch.float32, name  # master copies: LoRA, the new head, full weights
        elif parameter.ndim >= 2:
            assert parameter.dtype == torch.bfloat16, name
        else:
            assert parameter.dtype == torch.float32, name  # norms
    if adapter == "lora":
        assert torch.bfloat16 in dtypes.values() and any("score" in name for name in dtypes) == (method == "classify")
    assert model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).dtype == torch.float32
    output = model(input_ids=torch.tensor([[1, 2, 3, 4]]))  # no autocast here: the model enters it itself
    assert torch.isfinite(output.logits).all()


def head_case(weight_dtype: torch.dtype, trained: bool):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=generator, requires_grad=True)
    weight = (torch.randn(50, 32, generator=generator) * 0.3).to(weight_dtype).requires_grad_(trained)
    targets = torch.randint(0, 50, (300,), generator=generator)
    return hidden, weight, targets


@pytest.fixture
def head_kernel_dtypes(monkeypatch):
    """The (hidden, head) dtypes each fused head kernel's chunked products were given."""
    from tunesmith.train import loss, preference

    seen, kernel = [], loss.head_softmax_chunks

    def spy(hidden, head, targets):
        seen.append((hidden.dtype, head.dtype))
        return kernel(hidden, head, targets)

    for module in (loss, preference):
        monkeypatch.setattr(module, "head_softmax_chunks", spy)
    return seen


@pytest.mark.parametrize("weight_dtype, trained", [(torch.bfloat16, False), (torch.float32, True)])
def test_head_cross_entropy_in_bf16_matches_the_unfused_bf16_reference(weight_dtype, trained, head_kernel_dtypes):
    """Tolerance: bf16 products (8 bits of mantissa) summed in fp32: 1e-3 relative on the loss, and gradients
    within 2% of their scale."""
    hidden, weight, targets = head_case(weight_dtype, trained)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = HeadCrossEntropy.apply(hidden, weight, targets)
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone() if trained else None
    hidden.grad = None
    weight.grad = None
    reference_logits = (hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).T).float()
    reference = F.cross_entropy(reference_logits, targets, reduction="sum")
    reference.backward()
    assert head_kernel_dtypes == [(torch.bfloat16, torch.bfloat16)]  # the products ran at bf16's speed
    assert fused.dtype == torch.float32 and hidden.grad.dtype == grads[0].dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=0)
    scale = hidden.grad.abs().max()
    torch.testing.assert_close(grads[0], hidden.grad, rtol=0, atol=0.02 * float(scale))
    if trained:
        torch.testing.assert_close(grads[1], weight.grad, rtol=0, atol=0.02 * float(weight.grad.abs().max()))


def test_head_token_logprobs_in_bf16_match_the_unfused_bf16_reference(head_kernel_dtypes):
    """Tolerance: each log-probability within bf16 rounding of its logits; their sum and the gradient as above."""
    hidden, weight, targets = head_case(torch.bfloat16, False)
    upstream = torch.randn(targets.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = HeadTokenLogProbs.apply(hidden, weight, targets)
    (fused * upstream).sum().backward()
    fused_grad, hidden.grad = hidden.grad.clone(), None
    reference = -F.cross_entropy((hidden.to(torch.bfloat16) @ weight.T).float(), targets, reduction="none")
    (reference * upstream).sum().backward()
    assert head_kernel_dtypes == [(torch.bfloat16, torch.bfloat16)]
    assert fused.dtype == torch.float32
    # per token, a logit's bf16 rounding (2^-8 of logits up to ~5) moves a log-probability by up to ~0.02
    torch.testing.assert_close(fused, reference, rtol=0, atol=0.04)
    torch.testing.assert_close(fused.sum(), reference.sum(), rtol=1e-3, atol=0)
    torch.testing.assert_close(fused_grad, hidden.grad, rtol=0, atol=0.02 * float(hidden.grad.abs().max()))


def test_a_bf16_lora_run_learns_prints_its_dtype_and_resumes_bit_identically(
    tmp_path, tiny_model, chat_rows, monkeypatch, capsys
):
    overrides = ("train.dtype=bfloat16", "train.max_steps=6", "train.batch_size=2")
    straight, resumed = straight_and_resumed(tmp_path, tiny_model, chat_rows, overrides, 3, monkeypatch)
    assert "dtype: bfloat16 (train.dtype=bfloat16)" in capsys.readouterr().err
    losses = metric_lines(straight.output_dir)
    assert losses == metric_lines(resumed.output_dir)
    assert losses[-1][1] < losses[0][1]


def test_a_bf16_run_agrees_with_float32_within_rounding_and_float32_stays_the_exact_path(
    tmp_path, tiny_model, chat_rows, capsys
):
    """The same 4 LoRA steps in float32 and in bf16: every step's loss within 2% of float32's (bf16 keeps 8
    significant bits; the updates move both runs alike), yet not equal (bf16 really ran); auto on a CPU without
    native bf16 (as conftest.py has every test's machine) is float32."""
    fp32 = make_config(tmp_path, tiny_model, chat_rows, "train.max_steps=4", name="fp32")
    bf16 = make_config(tmp_path, tiny_model, chat_rows, "train.max_steps=4", "train.dtype=bfloat16", name="bf16")
    run(fp32)
    assert "dtype: float32 (auto: TUNESMITH_CPU_BF16=0)" in capsys.readouterr().err
    run(bf16)
    exact, rounded = metric_lines(fp32.output_dir), metric_lines(bf16.output_dir)
    assert exact != rounded and len(exact) == len(rounded) == 4
    for (step, loss, *_), (_, bf16_loss, *_) in zip(exact, rounded):
        assert abs(bf16_loss - loss) < 0.02 * loss, step


def test_fused_lora_and_gated_mlp_in_bf16_match_peft_unfused_in_bf16(tiny_model):
    """The fused LoRA linear and GatedDown over a base stored in bf16, against PEFT's unfused layers over the same
    weights, both under bf16 autocast. Tolerance: both round every product to bf16 (8 mantissa bits) in different
    orders; the loss within 1%, each LoRA gradient within 5% of its largest entry."""
    from test_fused_lora import lora_pair

    from tunesmith.models.precision import store_frozen_in

    fused, plain = lora_pair(tiny_model)
    for model in (fused, plain):
        store_frozen_in(model, torch.bfloat16)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (fused, plain):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_f, grads_f), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_f, loss_p, rtol=0.01, atol=0)
    assert grads_f.keys() == grads_p.keys() and any("down_proj" in name for name in grads_f)
    for name, grad in grads_p.items():
        assert grads_f[name].dtype == torch.float32, name
        torch.testing.assert_close(grads_f[name], grad, rtol=0, atol=0.05 * float(grad.abs().max()), msg=name)


def test_inference_in_bf16_runs_the_layers_in_bf16_and_keeps_the_head_in_float32(tiny_model, machine):
    """Engine.load on a CPU with native bf16: the layers' matrices in bf16 under autocast, the tied output head (and
    so the embedding) in float32, computing outside autocast. Against float32, its log-probabilities are at least
    as close as plain bf16 autocast's (the unfused reference; within 25%: both round every product), and within 0.15
    nats on this tiny model's large logits."""
    from tunesmith.engine.generation import Engine
    from tunesmith.models import load_model

    engine = Engine.load(str(tiny_model))
    dtypes = {name: parameter.dtype for name, parameter in engine.model.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # tied to lm_head
    assert dtypes["model.norm.weight"] == torch.float32
    reference, _ = load_model(tiny_model)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = F.log_softmax(reference(input_ids=ids).logits, -1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = F.log_softmax(reference(input_ids=ids).logits.float(), -1)
        logits = engine.model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    ours = F.log_softmax(logits, -1)
    error, plain_error = (float((x - exact).abs().max()) for x in (ours, plain))
    assert error <= plain_error * 1.25 and error < 0.15
    assert engine.generate([[{"role": "user", "content": "hello"}]], Sampling(max_new_tokens=4))


def test_a_bf16_classifier_infers_with_a_float32_head_and_a_run_trained_in_float32_infers_in_it(tiny_model, machine):
    from tunesmith.models import load_model
    from tunesmith.models.precision import for_inference

    reference, _ = load_model(tiny_model, num_labels=3)
    model, _ = load_model(tiny_model, num_labels=3)
    torch.nn.init.normal_(reference.score.weight, std=0.5)
    model.score.weight.data.copy_(reference.score.weight)
    for_inference(model)
    assert model.score.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0.03 * float(want.abs().max()))
    kept, _ = load_model(tiny_model, num_labels=3)
    for_inference(kept, TrainConfig(dtype="float32"))
    assert all(parameter.dtype == torch.float32 for parameter in kept.parameters())


def test_layers_reading_one_input_share_its_one_bf16_cast():
    """q, k and v (gate and up) read one input: it is cast once, so backward saves one bf16 copy, not three."""
    from tunesmith.models.fused_lora import cast_once

    x = torch.randn(4, 8, requires_grad=True)
    first, second = cast_once(x, torch.bfloat16), cast_once(x, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and first.data_ptr() == second.data_ptr()  # one copy in memory
    assert cast_once(x.detach().clone(), torch.bfloat16).data_ptr() != first.data_ptr()  # another tensor
    (first.float().sum() + second.float().sum()).backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, torch.full_like(x, 2.0))  # both readers' gradients
    y = torch.randn(4, 8)
    cast = cast_once(y, torch.bfloat16)
    assert cast_once(y, torch.bfloat16) is cast  # no gradient to route: the cast itself
    y.add_(1.0)  # changed in place: cast again
    assert cast_once(y, torch.bfloat16) is not cast and cast_once(y, torch.float32) is y
