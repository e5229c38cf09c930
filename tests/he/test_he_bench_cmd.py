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
