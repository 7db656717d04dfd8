"""The ``rotorquant`` command. ``rotorquant bench`` is the project's main job.

``rotorquant bench`` prints, as Markdown:

1. isotropic quality at d=128: MSE of unit vectors and the inner-product estimate
   ``<q, x_hat>`` against ``<q, x>`` (bias, RMSE, correlation), as in the TurboQuant paper;
2. bytes per vector and compression against fp16, from the ``nbytes`` of real codes;
3. real-model fidelity on all-MiniLM-L6-v2 (`rotorquant.bench.fidelity`);
4. a real decoder LLM with a compressed past (`rotorquant.bench.decoder`): perplexity of every rotation at
   every preset and of transformers' quantized caches, bytes per token, and per layer the attention-output
   cosine and the channel anisotropy of keys and values (``--model PATH``: any local causal LM);
5. CPU speed of the torch tier (and the Triton tier when a GPU is present).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .fidelity import Method

METHODS = tuple(
    f"{r}{t}"
    for r in ("rotor", "hadamard", "dense")
    for t in ("", "+qjl", "+nc", "+gauss", "+nc+gauss", "+cal", "+nc+cal", "+seqcal", "+nc+seqcal")
)
CALIBRATION_TAGS = {"cal": "model", "seqcal": "sequence"}
DEFAULT_METHODS = (
    "rotor", "dense", "rotor+qjl", "dense+qjl", "rotor+nc", "hadamard+nc", "rotor+nc+cal", "dense+nc+cal",
    "rotor+nc+seqcal",
)
SECTIONS = ("isotropic", "bytes", "fidelity", "llm", "speed")
LLM_ROTATIONS = ("rotor", "hadamard", "dense")
LLM_PEERS = (("quanto", 4), ("quanto", 2), ("hqq", 4))  # transformers' QuantizedCache backends and bits
LLM_COSINE_PRESETS = ("k4v2", "k3v3")
ISO_DIM = 128


class BenchError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def parse_method(label: str, bits: int = 3) -> Method:
    """``rotation[+qjl][+nc][+gauss][+cal|+seqcal]`` (one of `METHODS`) at ``bits`` -> `rotorquant.bench.fidelity.Method`."""
    rotation, *tags = label.split("+")
    calibration = next((CALIBRATION_TAGS[t] for t in tags if t in CALIBRATION_TAGS), "none")
    return Method(
        rotation=rotation, bits=bits, qjl="qjl" in tags, norm_correction="nc" in tags,
        codebook="gaussian" if "gauss" in tags else "exact", calibration=calibration,
    )


def _min_bits(method: Method) -> int:
    return 2 if method.qjl else 1


@dataclass
class BenchConfig:
    """What ``bench`` measures (from the command line)."""

    methods: list[Method]  # one per selected label; bits are taken from ``bits``
    bits: list[int]
    sections: list[str]
    sentences: int | None
    iso_vectors: int
    end_to_end: bool
    quick: bool
    seed: int = 0
    model: str | None = None


# ---------------------------------------------------------------- isotropic


def isotropic_rows(config: BenchConfig, progress) -> list[dict]:
    """MSE and inner-product quality on uniform unit vectors at d=128 (torch tier, float64).

    Data: ``n`` unit vectors and 64 unit queries from a stream independent of the quantizer's
    seed; every (query, vector) pair is one inner-product sample.
    """
    import torch

    from rotorquant.tiers import torch as tier

    rng = np.random.default_rng([config.seed, 2026])
    x = _unit(rng.standard_normal((config.iso_vectors, ISO_DIM)))
    q = _unit(rng.standard_normal((64, ISO_DIM)))
    x_t, q_t = torch.from_numpy(x), torch.from_numpy(q)
    true = q @ x.T
    rows = []
    grid = [m for m in _grid(config) if m.calibration == "none"]  # isotropic channels: a calibration is ~identity
    for method in progress(grid, "isotropic"):
        params = method.params(ISO_DIM, config.seed)
        code = tier.quantize(x_t, params)
        x_hat = tier.dequantize(code, params).numpy()
        est = tier.scores(q_t, code, params).numpy()
        err = est - true
        rows.append(
            dict(
                method=method.label,
                bits=method.bits,
                mse=float(np.mean(np.sum((x - x_hat) ** 2, axis=-1))),
                lloyd_max_mse=ISO_DIM * params.distortion,
                ip_bias=float(err.mean()),
                ip_slope=float(np.sum(est * true) / np.sum(true * true)),
                ip_rmse=float(np.sqrt(np.mean(err**2))),
                ip_corr=float(np.corrcoef(est.ravel(), true.ravel())[0, 1]),
            )
        )
    return rows


def _grid(config: BenchConfig) -> list[Method]:
    """Every selected method at every selected bit width it supports, ordered by bits."""
    return [
        dataclasses.replace(m, bits=b) for b in config.bits for m in config.methods if b >= _min_bits(m)
    ]


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def isotropic_table(rows: list[dict]) -> str:
    lines = [
        "| method | bits | MSE | Lloyd-Max d*D | IP bias | IP slope | IP RMSE | IP corr. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['mse']:.4f} | {r['lloyd_max_mse']:.4f} | {r['ip_bias']:+.5f} "
            f"| {r['ip_slope']:.4f} | {r['ip_rmse']:.5f} | {r['ip_corr']:.4f} |"
        )
    lines.append(
        "\nIP: estimated minus true `<q, x>` over every (query, vector) pair. With independent random queries"
        " the mean error (bias) is ~0 by symmetry even for a biased estimator; the slope"
        " `sum(est * true) / sum(true^2)` shows the multiplicative bias (1 = unbiased; MSE-only at 1 bit"
        " shrinks inner products by about 2/pi = 0.637)."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- bytes


def bytes_rows(config: BenchConfig) -> list[dict]:
    """Bytes per vector from the ``nbytes`` of 64 real codes, at d=32 (MiniLM) and d=128, fp32 and fp16 norms."""
    import torch

    from rotorquant import build_params
    from rotorquant.tiers import torch as tier

    x = torch.from_numpy(_unit(np.random.default_rng([config.seed, 7]).standard_normal((64, ISO_DIM))))
    rows = []
    for dim in (32, ISO_DIM):
        for method in _grid(config):
            if method.norm_correction or method.codebook != "exact" or method.calibration != "none":
                continue  # same bytes per vector as the plain method
            per_vector = {}
            for norm_dtype in ("float32", "float16"):
                spec = dataclasses.replace(method.spec(dim, config.seed), norm_dtype=norm_dtype)
                per_vector[norm_dtype] = tier.quantize(x[:, :dim].contiguous(), build_params(spec)).nbytes / len(x)
            fp16 = 2 * dim
            rows.append(
                dict(
                    dim=dim,
                    method=method.label,
                    bits=method.bits,
                    fp16_bytes=fp16,
                    bytes=per_vector["float32"],
                    ratio=fp16 / per_vector["float32"],
                    bytes_fp16_norms=per_vector["float16"],
                    ratio_fp16_norms=fp16 / per_vector["float16"],
                )
            )
    return rows


def bytes_table(rows: list[dict]) -> str:
    lines = [
        "| d | method | bits | fp16 bytes | bytes (fp32 norms) | vs fp16 | bytes (fp16 norms) | vs fp16 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dim']} | {r['method']} | {r['bits']} | {r['fp16_bytes']} | {r['bytes']:g} | {r['ratio']:.2f}x "
            f"| {r['bytes_fp16_norms']:g} | {r['ratio_fp16_norms']:.2f}x |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- fidelity


def fidelity_rows(config: BenchConfig, progress) -> tuple[list, dict]:
    """`rotorquant.bench.fidelity.measure` over the grid, and facts about the capture (size, channel outliers)."""
    from . import fidelity, minilm

    rows = fidelity.measure(
        _grid(config), config.sentences, seed=config.seed, end_to_end=config.end_to_end, progress=progress.enabled
    )
    capture = minilm.capture_qkv(config.sentences)
    info = dict(sentences=len(capture.sentences), tokens=int(capture.mask.sum()), **fidelity.channel_outliers(capture))
    for kind in ("model", "sequence"):
        method = next((m for m in _grid(config) if m.calibration == kind), None)
        if method is not None:
            info[f"{kind}_calibration_bytes"] = fidelity.calibration_nbytes(capture, method, config.seed)
    return rows, info


def calibration_note(info: dict) -> str:
    """What the ``+cal`` / ``+seqcal`` rows mean and what their statistics cost (empty without them)."""
    notes = []
    if "model_calibration_bytes" in info:
        notes.append(
            "+cal: keys centered, keys and values scaled per channel, with statistics of the other half of the "
            f"sentences (cross-fitted); all layers and heads: {info['model_calibration_bytes']} bytes, once per model."
        )
    if "sequence_calibration_bytes" in info:
        per_sentence = info["sequence_calibration_bytes"] / info["sentences"]
        notes.append(
            "+seqcal: the same statistics fitted on each sentence's own keys and values (as a KV cache can on its "
            f"prompt): {per_sentence:.0f} bytes per sentence, {info['sequence_calibration_bytes']} in all, "
            "on top of the codes (the bytes table does not include them)."
        )
    return "".join(n + "\n\n" for n in notes)


# ---------------------------------------------------------------- llm


def llm_protocol(config: BenchConfig):
    """The decoder protocol of the main job: 6 windows of 640 tokens, 512 prefilled (2 with --quick)."""
    from .decoder import Protocol

    return Protocol(window=640, prefill=512, windows=2 if config.quick else 6)


def llm_rows(config: BenchConfig, progress) -> dict:
    """`rotorquant.bench.decoder` under `llm_protocol`: the reference, every rotation at every preset, the peers;
    per layer, anisotropy and the attention-output cosine of every rotation at `LLM_COSINE_PRESETS`."""
    import torch

    from rotorquant.presets import PRESETS, preset

    from . import decoder

    start = time.perf_counter()
    tokenizer, model, name = decoder.load_model(config.model)
    text, origin = decoder.evaluation_text()
    ids = tokenizer(text).input_ids
    protocol = llm_protocol(config)
    reference = decoder.Reference(model, ids, protocol, progress)
    methods = [decoder.Method("rotorquant", p, r, config.seed) for p in PRESETS for r in LLM_ROTATIONS]
    methods += [decoder.Method(kind, bits=bits) for kind, bits in LLM_PEERS]
    rows = [reference.run("fp32 (exact)", lambda: decoder.Method("exact").cache(model.config), decoder.held_bytes)]
    for method in progress(methods, "llm methods"):
        rows.append(reference.run(method.label, lambda m=method: m.cache(model.config), decoder.held_bytes))
    layers = decoder.capture_qkv(model, torch.as_tensor(ids[: protocol.prefill]))
    dim = layers[0][1].shape[-1]
    cosines = {
        f"{r} {p.upper()}": decoder.layer_cosines(layers, *(
            dataclasses.replace(s, rotation=r, stages=None) for s in preset(p).specs(dim, seed=config.seed)
        ))
        for p in LLM_COSINE_PRESETS
        for r in LLM_ROTATIONS
    }  # fmt: skip
    return dict(
        model=name, text=origin, protocol=dataclasses.asdict(protocol), tokens=len(ids),
        reference_ppl=reference.ppl, rows=[r.as_dict() for r in rows], cosines=cosines,
        anisotropy=decoder.anisotropy(layers), seconds=time.perf_counter() - start,
    )  # fmt: skip


def llm_tables(result: dict) -> str:
    """The perplexity table and the per-layer table, as Markdown."""
    p = result["protocol"]
    lines = [
        f"Model: {result['model']}. Text: {result['text']['title']}, {result['text']['file']} of "
        f"{result['text']['package']}, SHA-256 {result['text']['sha256'][:16]}..., {result['tokens']} tokens. "
        f"{p['windows']} windows of {p['window']} tokens: {p['prefill']} prefilled exactly, then chunks of "
        f"{p['chunk']} reading the compressed past; {p['windows'] * (p['window'] - p['prefill'] - 1)} tokens scored. "
        f"fp32 perplexity {result['reference_ppl']:.3f}.",
        "",
        "| method | bytes/token/layer | perplexity | change vs fp32 | +- (s.e. over windows) | KL | s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['bytes_per_token_layer']:.0f} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f}% "
            f"| {r['sem_pct']:.2f}% | {r['kl']:.4f} | {r['seconds']:.1f} |"
        )
    lines += [
        "",
        "bytes: measured on each cache's tensors after every chunk, averaged (quanto and HQQ keep up to 128 "
        "recent tokens in full precision between requantizations). +-: standard error of the change over the "
        "windows, all methods on the same windows.",
        "",
        "Per layer: max/median per-channel RMS of keys and values after RoPE (mean over KV heads), and the cosine "
        "of causal attention outputs over quantize-dequantized against exact keys and values (prefill of the "
        "first window, torch tier).",
        "",
    ]
    names = list(result["cosines"])
    lines.append("| layer | key anisotropy | value anisotropy | " + " | ".join(f"cos {n}" for n in names) + " |")
    lines.append("|---:|---:|---:|" + "---:|" * len(names))
    for i, (ka, va) in enumerate(result["anisotropy"]):
        cells = " | ".join(f"{result['cosines'][n][i]:.4f}" for n in names)
        lines.append(f"| {i} | {ka:.2f} | {va:.2f} | {cells} |")
    means = " | ".join(f"{np.mean(result['cosines'][n]):.4f}" for n in names)
    ka, va = np.mean([a[0] for a in result["anisotropy"]]), np.mean([a[1] for a in result["anisotropy"]])
    lines.append(f"| mean | {ka:.2f} | {va:.2f} | {means} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- speed


SPEED_VECTORS = {False: 65536, True: 4096}  # vectors of the CPU speed table; --quick keeps it small


def speed_rows(config: BenchConfig) -> list[list[dict]]:
    """CPU tables from `rotorquant.bench.timing.speed_table_rows`, one per torch thread count: 1, and
    torch's default when it differs (a busy 2-core machine can make two threads slower than one).
    The NumPy reference is timed in the first table only."""
    import torch

    from .timing import speed_table_rows

    counts = sorted({1, torch.get_num_threads()})
    return [
        speed_table_rows(
            quick=config.quick, n=SPEED_VECTORS[config.quick], threads=t, numpy_tier=i == 0, seed=config.seed
        )
        for i, t in enumerate(counts)
    ]


def gpu_speed_rows(config: BenchConfig) -> list[dict]:
    """On CUDA: quantize and dequantize of float16 ``(n, 128)`` vectors, Triton and torch tiers, 3 bits,
    against ``x.clone()`` on the GPU; each call synchronizes. Empty without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    from rotorquant import QuantizerSpec, build_params
    from rotorquant.tiers import torch as torch_tier
    from rotorquant.tiers import triton as triton_tier
    from .timing import interleaved_seconds

    n, repeat = (16384, 5) if config.quick else (262144, 20)
    x = torch.randn(n, ISO_DIM, device="cuda", dtype=torch.float16)
    params = {r: build_params(QuantizerSpec(dim=ISO_DIM, bits=3, rotation=r)) for r in ("rotor", "dense")}
    timed = [("quantize", "x.clone() (floor)", x.clone), ("dequantize", "x.clone() (floor)", x.clone)]
    for name, tier in (("triton", triton_tier), ("torch", torch_tier)):
        for r, p in params.items():
            code = tier.quantize(x, p)
            timed.append(("quantize", f"{name} {r}", lambda t=tier, p=p: t.quantize(x, p)))
            timed.append(("dequantize", f"{name} {r}", lambda t=tier, p=p, c=code: t.dequantize(c, p)))

    def synced(fn):
        def call():
            fn()
            torch.cuda.synchronize()

        return call

    times = interleaved_seconds([(synced(fn), repeat) for _, _, fn in timed], warmup=3)
    clones = {op: t for (op, impl, _), t in zip(timed, times) if impl.startswith("x.clone")}
    rows = []
    for (op, impl, _), t in sorted(zip(timed, times), key=lambda item: item[0][0] == "dequantize"):
        ratio = statistics.median(a / b for a, b in zip(t, clones[op]))
        rows.append(dict(op=op, impl=impl, ms=1e3 * statistics.median(t), vs_clone=ratio, n=n, dim=ISO_DIM, bits=3))
    return rows


def gpu_speed_table(rows: list[dict]) -> str:
    import torch

    lines = [
        f"{rows[0]['n']} x {ISO_DIM} float16 vectors on {torch.cuda.get_device_name()}, 3 bits; medians, "
        "ratios taken round by round",
        "",
        "| op | implementation | ms | x clone |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['op']} | {r['impl']} | {r['ms']:.3f} | {r['vs_clone']:.2f} |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- plot


def write_plot(path: str, results: dict) -> None:
    """A PNG: isotropic MSE and MiniLM attention-output cosine against bits, per method; the decoder's
    perplexity change against bytes per token per layer, and its per-layer attention-output cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for key, ax, metric, title, log in (
        ("isotropic", axes[0, 0], "mse", f"isotropic unit vectors, d={ISO_DIM}: MSE", True),
        ("fidelity", axes[0, 1], "attn_cosine", "MiniLM: attention-output cosine", False),
    ):
        rows = results.get(key, [])
        labels = sorted({_row_label(r) for r in rows})
        for label in labels:
            pts = sorted((_row_bits(r), r[metric]) for r in rows if _row_label(r) == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("bits per coordinate")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            ax.set_yscale("log")
        _legend_or_empty(ax, labels)
    llm = results.get("llm")
    ax = axes[1, 0]
    if llm:
        groups: dict[str, list] = {}
        for r in llm["rows"][1:]:
            groups.setdefault(r["label"].split(" ")[0], []).append(r)
        for name, rows in groups.items():
            rows = sorted(rows, key=lambda r: r["bytes_per_token_layer"])
            ax.errorbar([r["bytes_per_token_layer"] for r in rows], [r["dppl_pct"] for r in rows],
                        yerr=[r["sem_pct"] for r in rows], marker="o", capsize=3, label=name)  # fmt: skip
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title("decoder: perplexity change vs fp32 (%)")
    ax.set_xlabel("bytes per token per layer")
    _legend_or_empty(ax, bool(llm))
    ax = axes[1, 1]
    for name, cos in (llm or {}).get("cosines", {}).items():
        ax.plot(range(len(cos)), cos, marker=".", label=name)
    ax.set_title("decoder: attention-output cosine per layer")
    ax.set_xlabel("layer")
    _legend_or_empty(ax, bool(llm))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise BenchError(f"--plot: cannot write {path!r}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _legend_or_empty(ax, measured) -> None:
    if measured:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)


def _row_label(row: dict) -> str:
    return row["method"]["label"] if isinstance(row["method"], dict) else row["method"]


def _row_bits(row: dict) -> int:
    return row["method"]["bits"] if isinstance(row["method"], dict) else row["bits"]


# ---------------------------------------------------------------- command line


class _Progress:
    """tqdm over a list, shown only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()

    def __call__(self, items, desc: str):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, disable=not self.enabled, leave=False)


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one line: ``rotorquant bench: error: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(kind: str, allowed: tuple, convert=str):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}, got {text!r}")
        out = []
        for t in items:
            try:
                value = convert(t)
            except ValueError:
                value = None
            if value not in allowed:
                raise argparse.ArgumentTypeError(f"expected {kind} from {', '.join(map(str, allowed))}; got {t!r}")
            out.append(value)
        return out

    return parse


def _positive_int(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rotorquant", description="RotorQuant / TurboQuant KV-cache compression.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    bench = sub.add_parser(
        "bench",
        help="measure quality, size, real-model fidelity and speed; print Markdown tables",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--quick", action="store_true", help="smaller samples (16 sentences, 1000 vectors): a smoke run")
    bench.add_argument(
        "--methods",
        type=_csv("methods", METHODS),
        default=list(DEFAULT_METHODS),
        help=(
            f"comma-separated, from {', '.join(METHODS)} (+qjl = 1-bit QJL residual sketch, +nc = norm correction, "
            f"+gauss = Gaussian-approximation codebook, +cal = per-channel calibration fitted on held-out sentences, "
            f"+seqcal = fitted on each sentence itself; +cal/+seqcal in the fidelity section only); "
            f"default {','.join(DEFAULT_METHODS)}"
        ),
    )
    bench.add_argument(
        "--bits",
        type=_csv("bits", (1, 2, 3, 4, 5, 6, 7, 8), int),
        default=[2, 3, 4],
        help="comma-separated bit widths, default 2,3,4",
    )
    bench.add_argument(
        "--sections",
        type=_csv("sections", SECTIONS),
        default=list(SECTIONS),
        help=f"comma-separated, from {', '.join(SECTIONS)}; default all",
    )
    bench.add_argument(
        "--sentences", type=_positive_int(2), default=None, help="MiniLM sentences (default all, 16 with --quick)"
    )
    bench.add_argument("--no-end-to-end", action="store_true", help="skip the sentence-embedding columns")
    bench.add_argument("--seed", type=_positive_int(0), default=0, help="quantizer seed (default 0)")
    bench.add_argument(
        "--model", metavar="PATH", default=None,
        help="the llm section's model: the folder of a local transformers causal LM (default SmolLM2-135M-Instruct)",
    )  # fmt: skip
    bench.add_argument("--json", metavar="PATH.json", help="also write every measured number as JSON")
    bench.add_argument("--plot", metavar="PATH.png", help="also write a PNG plot (matplotlib)")
    return parser


def run_bench(config: BenchConfig, out=None) -> dict:
    """Measure the selected sections, print them as Markdown to ``out`` (stdout), return the raw results."""
    out = sys.stdout if out is None else out
    progress = _Progress()
    results: dict = {}
    results["config"] = dict(
        methods=[m.label for m in config.methods], bits=config.bits, sections=config.sections, seed=config.seed,
        quick=config.quick,
    )
    print("# rotorquant bench\n", file=out)
    if "isotropic" in config.sections:
        t = time.perf_counter()
        results["isotropic"] = isotropic_rows(config, progress)
        print(f"## Isotropic unit vectors, d={ISO_DIM} ({config.iso_vectors} vectors x 64 queries)\n", file=out)
        print(isotropic_table(results["isotropic"]), file=out)
        print(f"\n_{time.perf_counter() - t:.1f} s_\n", file=out)
    if "bytes" in config.sections:
        results["bytes"] = bytes_rows(config)
        print("## Bytes per vector (from `Compressed.nbytes`)\n", file=out)
        print(bytes_table(results["bytes"]) + "\n", file=out)
    if "fidelity" in config.sections:
        from .fidelity import markdown_table

        t = time.perf_counter()
        rows, info = fidelity_rows(config, progress)
        results["fidelity"] = [r.as_dict() for r in rows]
        results["fidelity_data"] = info
        print(
            f"## Real-model fidelity: all-MiniLM-L6-v2, {info['sentences']} sentences, {info['tokens']} tokens, "
            f"6 layers x 12 heads, d=32, K and V at the same bits, seed {config.seed}\n",
            file=out,
        )
        print(markdown_table(rows), file=out)
        print(
            f"\nKey channels: max/median per-channel RMS {info['key_channel_ratio']:.2f} "
            f"(values {info['value_channel_ratio']:.2f}), mean over layers and heads. "
            f"_{time.perf_counter() - t:.1f} s_\n",
            file=out,
        )
        print(calibration_note(info), file=out)
    if "llm" in config.sections:
        results["llm"] = llm_rows(config, progress)
        print(f"## A real decoder LLM: perplexity with a compressed past (_{results['llm']['seconds']:.0f} s_)\n", file=out)
        print(llm_tables(results["llm"]) + "\n", file=out)
    if "speed" in config.sections:
        from .timing import speed_table_markdown

        results["speed"] = speed_rows(config)
        print("## CPU speed\n", file=out)
        for rows in results["speed"]:
            print(speed_table_markdown(rows) + "\n", file=out)
        results["speed_gpu"] = gpu_speed_rows(config)
        if results["speed_gpu"]:
            print("## GPU speed\n", file=out)
            print(gpu_speed_table(results["speed_gpu"]) + "\n", file=out)
    return results


def check_output_path(option: str, path: str | None, suffix: str) -> None:
    """An output file named by ``option`` can be written where it says, before anything is measured: a path
    ending in ``suffix`` (never rewritten to another name) whose folder exists, and not a folder itself."""
    if path is None:
        return
    if os.path.isdir(path):
        raise BenchError(f"{option}: expected a file path ending in {suffix}, got the folder {path!r}")
    if not path.endswith(suffix):
        raise BenchError(f"{option}: expected a file path ending in {suffix}, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BenchError(f"{option}: expected a file in an existing folder, got {path!r} ({folder} does not exist)")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise BenchError(
            f"{option}: expected a file in a writable folder, got {path!r} ({folder} is not writable: {exc.strerror or exc})"
        ) from None


def _bench(args: argparse.Namespace) -> int:
    check_output_path("--json", args.json, ".json")
    check_output_path("--plot", args.plot, ".png")
    if args.model is not None and not os.path.isdir(args.model):
        raise BenchError(f"--model: expected the folder of a local transformers causal LM, got {args.model!r}")
    methods = [parse_method(label) for label in dict.fromkeys(args.methods)]
    bits = sorted(set(args.bits))
    if all(b < _min_bits(m) for m in methods for b in bits):
        raise BenchError("--bits: QJL methods need bits >= 2; nothing left to measure")
    config = BenchConfig(
        methods=methods,
        bits=bits,
        sections=[s for s in SECTIONS if s in args.sections],
        sentences=args.sentences if args.sentences is not None else (16 if args.quick else None),
        iso_vectors=1000 if args.quick else 4000,
        end_to_end=not args.no_end_to_end,
        quick=args.quick,
        seed=args.seed,
        model=args.model,
    )
    results = run_bench(config)
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2)
        except OSError as exc:
            raise BenchError(f"--json: cannot write {args.json!r}: {exc.strerror or exc}") from None
    if args.plot:
        write_plot(args.plot, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args)
    except (BenchError, ValueError, ImportError) as exc:
        print(f"rotorquant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rotorquant {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    return 0


if __name__ == "__main__":
    sys.exit(main())
