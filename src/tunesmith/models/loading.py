"""From the config's `model:` value to a loaded model and tokenizer.

`model:` may be a built-in name, a local transformers directory, a `.gguf` file, or a Hugging Face hub
id that is already in the local hub cache. Everything resolves to a local directory first, so loading
itself never touches the network and never runs code shipped with a model.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.errors import UserError, did_you_mean
from tunesmith.models import catalog
from tunesmith.models.cache_files import exclusive_lock, sha256_of_file
from tunesmith.models.gguf import convert_gguf
from tunesmith.models.heads import is_head
from tunesmith.paths import model_cache

if TYPE_CHECKING:  # torch is imported only when a model is really loaded
    import torch

# `org/name` or a bare legacy name like `gpt2`: what the hub accepts as a model repository id.
_HUB_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
# What transformers' sequence classifiers call their output head (decoders: score; encoders: classifier).
# Hex digits of the GGUF's sha256 that name its cache directory: 64 bits, collisions are not a concern.
_GGUF_HASH_PREFIX_LENGTH = 16


def resolve_model(spec: str | Path) -> Path:
    """The local transformers directory that `spec` (the config's `model:` value) stands for."""
    text = str(spec).strip()
    if not text:
        raise UserError(f"model: is empty; built-in models: {', '.join(catalog.model_names())}")
    if text in catalog.CATALOG:
        return catalog.pull(text)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        return resolve_gguf(path)
    if path.is_dir():
        return check_model_directory(path)
    if path.exists():
        raise UserError(f"model '{text}' is a file; expected a model directory (with config.json) or a .gguf file")
    if _HUB_ID_PATTERN.match(text):
        cached = find_in_hub_cache(text)
        if cached is not None:
            return cached
    raise unresolved_model_error(text)


def check_target(spec: str | Path) -> None:
    """Refuse at once a target (of eval, chat, generate, score, redteam, label) that names a path which is not
    there, before a command reads anything else, so `eval runs/nope` says so rather than asking for data."""
    text = str(spec).strip()
    if (
        looks_like_path(text)
        and not Path(text).expanduser().exists()
        and not (_HUB_ID_PATTERN.match(text) and find_in_hub_cache(text) is not None)
    ):
        raise unresolved_model_error(text)


def looks_like_path(text: str) -> bool:
    """A target written as a path (`runs/x`, `./x`, `~/x`), not a built-in or library name. `org/name` looks
    like both a path and a hub id; resolve_model tries the local hub cache for it first."""
    return "/" in text or text.startswith((".", "~"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_model_directory(directory: Path) -> Path:
    """`directory` if it holds a transformers model tunesmith may load (a config of an architecture transformers
    ships, safetensors weights, tokenizer files), else a UserError saying what is wrong and the fix."""
    import json

    from transformers import CONFIG_MAPPING

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"model directory '{directory}' has no config.json, so it is not a transformers model directory; "
            f"fix: point model: at the directory that holds config.json, the weights (*.safetensors) "
            f"and the tokenizer files, or at a .gguf file"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{config_file}:1: not valid JSON ({error}); fix: restore the model's config.json") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in CONFIG_MAPPING:
        code = f" and its config.json's auto_map names code shipped with the model ({', '.join(config['auto_map'])})"
        raise UserError(
            f"{config_file}:1: model_type {model_type!r} is not an architecture transformers ships"
            f"{code if isinstance(config, dict) and config.get('auto_map') else ''}; tunesmith never runs code that "
            "comes with a model; fix: use a model of a transformers architecture (tunesmith models list names two), "
            "or a transformers version that includes this one"
        )
    weights = list(directory.glob("*.safetensors"))
    if not weights:
        pickles = sorted(path.name for pattern in PICKLE_WEIGHTS for path in directory.glob(pattern))
        found = f" (only {', '.join(pickles)}: pickle files, which tunesmith never loads)" if pickles else ""
        raise UserError(
            f"model directory '{directory}' has no *.safetensors weights{found}; fix: put the model's safetensors "
            "files beside config.json (a pickle checkpoint converts with transformers' save_pretrained("
            "safe_serialization=True) in a trusted environment)"
        )
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"model directory '{directory}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); fix: copy the "
            "tokenizer files of the model into it (tokenizer.save_pretrained(directory))"
        )
    return directory


def resolve_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file once into the model cache, keyed by its content hash, and reuse that."""
    if not gguf_path.is_file():
        raise UserError(f"model file '{gguf_path}' does not exist; fix: check the path in model:")
    check_gguf_architecture(gguf_path)
    digest = sha256_of_file(gguf_path)
    target = model_cache() / f"gguf-{digest[:_GGUF_HASH_PREFIX_LENGTH]}"
    with exclusive_lock(model_cache() / f".{target.name}.lock"):
        if not (target / "config.json").is_file():
            convert_gguf(gguf_path, target, source={"gguf": str(gguf_path.resolve()), "sha256": digest})
    return target


def check_gguf_architecture(gguf_path: Path) -> None:
    """Refuse, with the fix, a GGUF that is not one or whose architecture transformers' GGUF reader cannot convert."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = GGUFReader(gguf_path).fields.get("general.architecture")
        architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except (ValueError, OSError) as error:
        raise UserError(
            f"model file '{gguf_path}' is not a readable GGUF file ({error}); fix: check the path"
        ) from None
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if architecture not in supported:
        raise UserError(
            f"model file '{gguf_path}' holds a {architecture} model, an architecture transformers' GGUF reader "
            f"cannot convert (it reads {', '.join(supported)}); fix: use the model's transformers directory "
            "(config.json + safetensors) instead of its GGUF"
        )


def find_in_hub_cache(repo_id: str) -> Path | None:
    """The snapshot of `repo_id` already in the local Hugging Face cache, or None. Never downloads."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, an invalid id, or no huggingface_hub: all mean "not available here"
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def unresolved_model_error(spec: str) -> UserError:
    builtin = ", ".join(catalog.model_names())
    if looks_like_path(spec):
        return missing_path_error(spec, builtin)
    message = (
        f"model '{spec}' is not a built-in model{did_you_mean(spec, catalog.model_names())}, "
        f"a local directory or a .gguf file"
    )
    if "/" in spec and _HUB_ID_PATTERN.match(spec):
        message += (
            ", and tunesmith does not download from the Hugging Face hub at run time; "
            f"fix: download it on a connected machine (e.g. `huggingface-cli download {spec} --local-dir DIR`) "
            "and set model: DIR"
        )
    else:
        message += "; fix: use a built-in name, or the path of a model directory or .gguf file"
    return UserError(f"{message}. Built-in models: {builtin}")


def missing_path_error(spec: str, builtin: str) -> UserError:
    """`PATH: no such run directory or model`, with the closest entry beside it and what a target can be. A
    hub-shaped `org/name` whose `org` is no local directory gets the hub's fix too."""
    path = Path(spec).expanduser()
    parent = path.parent
    nearby = (
        [entry.name for entry in parent.iterdir() if entry.is_dir() or entry.suffix == ".gguf"]
        if parent.is_dir()
        else []
    )
    close = difflib.get_close_matches(path.name, nearby, n=1, cutoff=0.6)
    suggestion = f" (did you mean '{parent / close[0]}'?)" if close else ""
    message = (
        f"{spec}: no such run directory or model{suggestion}; fix: give the output_dir "
        f"of a train run, a model directory or .gguf file, or a built-in model name (`tunesmith models "
        f"list`: {builtin})"
    )
    if _HUB_ID_PATTERN.match(spec) and not parent.is_dir():
        message += (
            f". If {spec} is a Hugging Face hub id: tunesmith does not download from the Hugging Face hub "
            f"at run time; download it on a connected machine (`huggingface-cli download {spec} "
            f"--local-dir DIR`) and give DIR"
        )
    return UserError(message)


def load_tokenizer(spec: str | Path) -> Any:
    """The tokenizer for `spec`, with a pad token (eos when the model defines none)."""
    from transformers import AutoTokenizer

    directory = resolve_model(spec)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    # Batching needs a pad token; reusing eos adds no embedding row (padded positions are masked anyway).
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # A missing chat template is left as is: the data code reports it where it knows the format needs one.
    return tokenizer


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    num_labels: int | None = None,
) -> tuple[Any, Any]:
    """`(model, tokenizer)` for `spec`: a causal LM in `dtype` on `device`, no remote code.

    `quantization="nf4"` loads the linear layers in 4-bit NF4 with double quantisation (bitsandbytes,
    which runs on CPU too), computing in `dtype`: the base of QLoRA. `num_labels` loads a sequence
    classifier with that many outputs instead (a reward model has one); a head the checkpoint does not
    hold starts at zero, so every first output is 0 rather than the noise of a random head.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunesmith.models import attention
    from tunesmith.models.families import is_checked

    directory = resolve_model(spec)
    tokenizer = load_tokenizer(directory)
    options: dict[str, Any] = {}
    if quantization is not None:
        options = {
            "quantization_config": quantization_config(quantization, _as_torch_dtype(dtype)),
            "device_map": {"": str(device)},
        }
    if num_labels is not None:
        options.update(num_labels=num_labels, output_loading_info=True)
    model_class = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    with quiet_transformers():
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        model = model_class.from_pretrained(
            directory,
            dtype=_as_torch_dtype(dtype),
            # SDPA, plus padding-free packed training; transformers' own SDPA for a family nobody checked it on
            attn_implementation=attention.NAME if is_checked(config) else "sdpa",
            local_files_only=True,
            trust_remote_code=False,
            **options,
        )
    if num_labels is not None:
        model, info = model
        for name, parameter in model.named_parameters():
            if name in info["missing_keys"] and is_head(name):
                parameter.detach().zero_()
    if quantization is None:
        model.to(device)
    else:
        keep_small_layers_off_packed_cpu_path(model)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def skeleton_model(
    spec: str | Path, *, num_labels: int | None = None, layer_types: list[str] | None = None, device: str = "meta"
) -> Any:
    """`spec`'s model built from its config.json alone, reading no weights: on the meta device (shapes and dtypes,
    no memory), or with `device="cpu"` in uninitialised memory set to zero. `layer_types` builds only that many
    decoder layers, of those kinds (a model with `config.layer_types`, e.g. Gemma's sliding and full attention), as
    `tunesmith plan` does to measure one layer's activations. The same class and attention as `load_model`'s."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunesmith.models import attention
    from tunesmith.models.families import is_checked

    directory = resolve_model(spec)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    if layer_types is not None:
        config.num_hidden_layers = len(layer_types)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(layer_types)
    if num_labels is not None:
        config.num_labels = num_labels
    model_class = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    implementation = attention.NAME if is_checked(config) else "sdpa"
    with quiet_transformers(), torch.device("meta"):
        model = model_class.from_config(config, attn_implementation=implementation, dtype=torch.float32)
    if device != "meta":
        model.to_empty(device=device)
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                tensor.zero_()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model


def quantization_config(kind: str, compute_dtype: Any) -> Any:
    if kind != "nf4":
        raise UserError(f"quantization '{kind}' is not supported; fix: use nf4")
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype if compute_dtype != "auto" else None,
    )


def defer_bitsandbytes() -> None:
    """Keep bitsandbytes out of this process until 4-bit work asks for it (`import_bitsandbytes`).

    peft imports bitsandbytes whenever it is installed (peft/helpers.py; IA3 and AdaLoRA when they wrap layers),
    and importing it asks the Hugging Face hub for a CPU kernel (through the `kernels` package) and warns, telling
    users to set trust_remote_code: every plain LoRA command paid for that. A None entry in sys.modules makes an
    import of it fail at once, and peft and transformers then treat it as not installed. The `tunesmith` command
    calls this first; a library caller that has imported bitsandbytes itself keeps it.
    """
    sys.modules.setdefault("bitsandbytes", None)


# What peft and transformers remember about bitsandbytes being installed (functools caches), reset when it loads.
_AVAILABILITY_CHECKS = (
    ("peft.import_utils", "is_bnb_available"),
    ("peft.import_utils", "is_bnb_4bit_available"),
    ("transformers.utils.import_utils", "is_bitsandbytes_available"),
)
_ABSENT = object()  # `kernels` was not imported before bitsandbytes was


def import_bitsandbytes() -> Any:
    """bitsandbytes for 4-bit work, loaded quietly and offline.

    Its CPU backend looks up a faster kernel on the Hugging Face hub as it imports (kernels-community, run as
    downloaded code); the `kernels` package is hidden for that import, so the lookup fails at once, silently, and
    bitsandbytes keeps its own built-in kernel. Lifts `defer_bitsandbytes`.
    """
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
        for module_name, function_name in _AVAILABILITY_CHECKS:
            check = getattr(sys.modules.get(module_name), function_name, None)
            if hasattr(check, "cache_clear"):
                check.cache_clear()  # an answer given while it was deferred
    hidden = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "failed to load the kernel" warning: expected here, and not the user's
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            "adapter.type=qlora needs bitsandbytes (4-bit NF4 weights); fix: pip install bitsandbytes"
        ) from None
    finally:
        logger.setLevel(level)
        if hidden is _ABSENT:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden
    return bitsandbytes


def keep_small_layers_off_packed_cpu_path(model: Any) -> None:
    """Keep 4-bit layers off bitsandbytes' repacked CPU kernel where it would fail or change the numbers.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel the first time a
    layer runs without gradients (evaluation, generation). That kernel computes in bfloat16, and it needs
    the output size to be a multiple of 32 and the input size a multiple of the quantisation block. So a
    model computing in float32 keeps the kernel it trained with (evaluation then scores what training
    computed), and a layer too small to repack (a test model's) keeps it too instead of failing with a
    reshape error. A bfloat16 model with layers that qualify keeps the fast path.
    """
    import torch

    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        block = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
        fits = module.out_features % 32 == 0 and module.in_features % block == 0
        if not fits or module.compute_dtype != torch.bfloat16:
            module.support_avx512bf16_for_cpu = False


def _as_torch_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """Accept `torch.bfloat16` or the config spelling `"bfloat16"`; `"auto"` keeps the checkpoint's dtype."""
    import torch

    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise UserError(f"dtype '{dtype}' is not a torch dtype; fix: use float32, bfloat16, float16 or auto")
    return resolved


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs and its weight-loading progress bars, then restore them."""
    from transformers.utils import logging as transformers_logging

    previous_verbosity = transformers_logging.get_verbosity()
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous_verbosity)
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()
