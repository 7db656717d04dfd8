"""Smoke tests of `benchmarks/`: each script runs (on tiny shapes, or compiling without a GPU) and prints
what it promises, so a broken benchmark shows in CI and not on a borrowed GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_PTXAS = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")


def _pythonpath() -> str:
    """The repository first, then this process's own PYTHONPATH."""
    return os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)


@pytest.mark.skipif(not INTERPRETING, reason="on a GPU, benchmarks/gpu_check.sh runs the real tables")
def test_gpu_speed_tables_run_on_the_interpreter(monkeypatch, capsys):
    """`benchmarks/gpu_speed.py`'s tables and sweeps on tiny CPU shapes, every timer replaced by one call
    of the timed function: a broken benchmark shows here, not on a borrowed GPU. The printed times are
    placeholders (1.0), not measurements."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import gpu_speed

    def once(fn, *args, **kwargs):
        fn()
        return 1.0

    monkeypatch.setattr(gpu_speed, "DEVICE", "cpu")
    for timer in ("graph_us", "busy_us", "api_us"):
        monkeypatch.setattr(gpu_speed, timer, once)
    gpu_speed.quantize_table([40], dim=128, bits=3)
    gpu_speed.quantize_sweep(40, dim=128, bits=3)
    gpu_speed.attention_table([48], batch=1, q_heads=4, kv_heads=2, dim=32, bits=3)
    gpu_speed.attention_sweep(40, batch=1, q_heads=4, kv_heads=2, dim=32, bits=3)
    gpu_speed.append_table([3, 20], kv_heads=2, dim=32, bits=3)
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line[:1].isdigit()]
    assert len(rows) == 1 + 8 + 1 + 9 + 2, "\n".join(lines)
    append_rows = [line for line in rows if line.startswith(("3 |", "20 |"))]
    assert len(append_rows) == 2 and all(line.endswith("| True") for line in append_rows), append_rows
    attention_row = [line for line in rows if line.startswith("48 |")]  # last cells: max |paged - contiguous|,
    assert len(attention_row) == 1, attention_row  # max |triton - SDPA on the dequantized cache|
    paged_err, sdpa_err = (float(cell) for cell in attention_row[0].split("|")[-2:])
    assert paged_err == 0.0 and sdpa_err < 1e-2, attention_row


@pytest.mark.skipif(not os.path.exists(_PTXAS), reason="triton's bundled ptxas is missing")
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles for sm_90 on machines without a GPU")
def test_sass_count_benchmark_finds_the_key_loop(tmp_path):
    """`benchmarks/sass_count.py` compiles the attention and quantize launches for sm_90 and prints one
    comparable line per loop, with per-code figures that follow from the counts it reports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _pythonpath()
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = os.path.join(ROOT, "benchmarks", "sass_count.py")
    done = subprocess.run([sys.executable, script, "--bits", "3", "--dims", "128", "--packings", "contiguous,interleaved"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    line = re.compile(r"^sass: attention loop, bits=3, head_dim=128, packing=contiguous: (\d+\.\d) instructions per "
                      r"code \(BLOCK_N (\d+), (\d+) warps, (\d+) loop instructions")  # fmt: skip
    found = [line.match(x) for x in done.stdout.splitlines() if line.match(x)]
    assert len(found) == 1, done.stdout
    per_code, block_n, warps, loop = found[0].groups()
    assert int(loop) > 100 and float(per_code) == pytest.approx(int(loop) * int(warps) * 32 / (2 * int(block_n) * 128), abs=0.0501)
    line = re.compile(r"^sass: attention loop, bits=3, head_dim=128, packing=interleaved: (\d+\.\d) instructions per "
                      r"code \(BLOCK_N (\d+), (\d+) warps, (\d+) loop instructions; (.*)\)$")  # fmt: skip
    found = [line.match(x) for x in done.stdout.splitlines() if line.match(x)]
    assert len(found) == 1, done.stdout
    interleaved, block_n, warps, loop, common = found[0].groups()
    assert float(interleaved) == pytest.approx(int(loop) * int(warps) * 32 / (2 * int(block_n) * 128), abs=0.0501)
    assert "PRMT" in common and float(interleaved) < float(per_code), done.stdout  # same run, same shapes
    for rotation in ("rotor", "dense"):
        line = re.compile(rf"^sass: quantize, bits=3, head_dim=128, rotation={rotation}: (\d+\.\d) instructions per "
                          r"coordinate \((\d+) vectors per program, (\d+) warps, (\d+) instructions")  # fmt: skip
        found = [line.match(x) for x in done.stdout.splitlines() if line.match(x)]
        assert len(found) == 1, done.stdout
        per_coord, block_n, warps, count = found[0].groups()
        want = int(count) * int(warps) * 32 / (int(block_n) * 128)
        assert int(count) > 100 and float(per_coord) == pytest.approx(want, abs=0.0501)
