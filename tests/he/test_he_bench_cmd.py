"""``bench he`` through its own argparse parser (the CLI wires ``register`` the same way)."""

from __future__ import annotations

import argparse
import json

import pytest

from fedfms_secure.commands.bench import register

KEYS = {"params", "bytes_per_param", "encrypt_s", "decrypt_s", "sum_s_per_site", "max_abs_error"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfms-secure")
    register(parser.add_subparsers())
    return parser


def test_bench_he_prints_one_json_line(capsys) -> None:
    args = _parser().parse_args(["bench", "he", "--params", "3.2768e4", "--sites", "4", "--rounds", "2", "--json"])
    assert args.handler(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert KEYS <= result.keys()
    assert result["params"] == 32768 and result["sites"] == 4
    assert result["bytes_per_param"] < 4.0 and result["bytes_per_param_sum"] < 8.0  # two full chunks
    assert 0 < result["max_abs_error"] <= result["error_bound"] == 4 * result["step"]
    assert result["ckks_error_bound_units"] < 0.5  # decoding the integers is exact
    assert min(result["encrypt_s"], result["decrypt_s"], result["sum_s_per_site"]) > 0


def test_bench_he_refuses_bad_counts_and_impossible_packings(capsys) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "he", "--params", "1.5"])
    assert "whole number" in capsys.readouterr().err
    args = _parser().parse_args(["bench", "he", "--params", "100", "--quant-bits", "20"])
    from fedfms_secure.errors import ConfigError

    with pytest.raises(ConfigError, match="over the 8 B limit"):
        args.handler(args)


def test_bench_he_sizes_the_step_from_the_plan(capsys) -> None:
    """The demo plan (lr 3e-3, 20 local steps, 3 sites x 5 rounds): 10 bits, 3 lanes, error < 1% of the noise."""
    args = _parser().parse_args(["bench", "he", "--params", "4.9152e4", "--lr", "3e-3", "--local-steps", "20",
                                 "--json"])
    assert args.handler(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bound"] == pytest.approx(0.06) and result["noise_std"] == pytest.approx(0.06 / 20**0.5 / 3)
    assert (result["quant_bits"], result["lanes"], result["lane_bits"]) == (10, 3, 15)
    assert 0.003 < result["error_to_noise"] <= 0.01
    assert result["bytes_per_param"] < 2.7 and result["bytes_per_param_sum"] < 5.4  # two full chunks
    given = _parser().parse_args(["bench", "he", "--params", "1000", "--bound", "0.06", "--noise-std", "0.00447",
                                  "--max-error-ratio", "0.03", "--json"])
    assert given.handler(given) == 0
    assert json.loads(capsys.readouterr().out)["quant_bits"] == 8
