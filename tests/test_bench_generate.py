"""``moekit bench generate``: tokens/s of transformers MoE models, patched and not, and moekit's LM.

Verified (tiny models, --quick, seconds; no timing is judged):
- the quick bench for two families (Mixtral, which also converts to moekit's LM, and
  DeepSeek-V3, which does not) prints one JSON document on stdout with every column for every
  implementation, the CPU, torch version, dtype and threads, and identical greedy tokens;
- greedy tokens that differ are reported (table, notes, JSON) and --strict exits 1;
- the bytes-per-token formula: by hand on a tiny Mixtral config, and against a count of the
  parameters each family's models really have (quick and full size, on the meta device);
- the full-size configs reach 1 GB of weights at both dtypes with the fewest layers;
- the bandwidth probe returns positive numbers; bad flags exit 2 naming the flag.

Run: ``python -m pytest tests/test_bench_generate.py``
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from moekit.cli.main import main

pytest.importorskip("transformers")

from moekit.experiments.bench import generate as bench

COLUMNS = {
    "impl", "label", "prefill_tokens_per_s", "decode_tokens_per_s", "prefill_vs_transformers",
    "decode_vs_transformers", "weight_read_gb_per_s", "share_of_bandwidth", "identical_tokens", "first_mismatch",
    "round_prefill_tokens_per_s", "round_decode_tokens_per_s", "round_probe_gb_per_s", "tokens",
}


def test_quick_bench_json_has_every_column_and_identical_tokens(monkeypatch, capsys):
    # the llama.cpp row depends on an optional package: tests/test_gguf.py covers it both ways
    monkeypatch.setattr(bench, "llama_cpp_missing", lambda: "not installed (tested in tests/test_gguf.py)")
    args = ["bench", "generate", "--quick", "--families", "mixtral,deepseek_v3", "--rounds", "2", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is the JSON document and nothing else
    assert report["bench"] == "generate" and report["dtype"] == "float32"
    assert report["cpu"] and report["torch"] == torch.__version__ and report["threads"] == torch.get_num_threads()
    assert (report["prompt_tokens"], report["new_tokens"], report["rounds"]) == (16, 8, 2)
    # 3 at the start, then per round one before the first run and one after each (mixtral: 3 runs, deepseek_v3: 2)
    probes = 3 + 2 * (1 + 3) + 2 * (1 + 2)
    assert report["memory_bandwidth"]["gb_per_s"] > 0 and len(report["memory_bandwidth"]["runs_gb_per_s"]) == probes
    assert report["identical_tokens"] is True
    families = {f["family"]: f for f in report["families"]}
    assert list(families) == ["mixtral", "deepseek_v3"]
    assert [r["impl"] for r in families["mixtral"]["results"]] == ["transformers", "patch_moe", "moekit_lm"]
    assert [r["impl"] for r in families["deepseek_v3"]["results"]] == ["transformers", "patch_moe"]
    assert "moekit_lm" in families["deepseek_v3"]["skipped"]
    for family in families.values():
        assert family["identical_tokens"] is True and family["weight_bytes"] > 0
        config = bench.build_config(bench.FAMILIES[family["family"]], quick=True)
        assert family["bytes_per_token"] == bench.weight_bytes_per_token(config, torch.float32)
        for result in family["results"]:
            assert set(result) == COLUMNS
            assert result["identical_tokens"] is True and result["first_mismatch"] is None
            assert len(result["tokens"]) == 8 and len(result["round_decode_tokens_per_s"]) == 2
            assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
            expected_read = family["bytes_per_token"]["total"] * result["decode_tokens_per_s"] / 1e9
            assert result["weight_read_gb_per_s"] == pytest.approx(expected_read, rel=1e-3, abs=1e-4)
            # each run's read rate over the mean of the probes just before and after it, median over rounds
            assert len(result["round_probe_gb_per_s"]) == 2
            assert all(min(family["round_bandwidth_gb_per_s"]) <= p <= max(family["round_bandwidth_gb_per_s"])
                       for p in result["round_probe_gb_per_s"])
            rounds = zip(result["round_decode_tokens_per_s"], result["round_probe_gb_per_s"], strict=True)
            per_token = family["bytes_per_token"]["total"]
            per_round = [per_token * tokens_per_s / 1e9 / probe for tokens_per_s, probe in rounds]
            assert result["share_of_bandwidth"] == pytest.approx(statistics.median(per_round), rel=1e-2, abs=1e-4)
        # the comparison means something only when the tokens are not one token repeated
        assert len(set(family["results"][0]["tokens"])) >= 3
        transformers_row = family["results"][0]
        assert transformers_row["prefill_vs_transformers"] == transformers_row["decode_vs_transformers"] == 1.0
    title = captured.err.splitlines()
    header = next(line for line in title if line.startswith("moekit bench generate on "))
    assert report["cpu"] in header and torch.__version__ in header and "float32" in header and "threads" in header
    assert "memory bandwidth:" in captured.err


def test_different_tokens_are_reported_and_strict_exits_1(monkeypatch, capsys):
    real_patch_moe = bench.patch_moe

    def patch_and_break(model):
        patched = real_patch_moe(model)
        with torch.no_grad():
            model.lm_head.weight.neg_()  # a different model: its greedy tokens differ from the first one on
        return patched

    monkeypatch.setattr(bench, "patch_moe", patch_and_break)
    args = ["bench", "generate", "--quick", "--families", "olmoe", "--rounds", "1", "--json"]
    assert main(args) == 0  # reported, but not an error without --strict
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    (family,) = report["families"]
    transformers_row, patched_row = family["results"]
    assert transformers_row["identical_tokens"] is True
    assert patched_row["identical_tokens"] is False and patched_row["first_mismatch"] == 0
    assert report["identical_tokens"] is False
    assert any("TOKENS DIFFER" in note and "patch_moe" in note for note in report["notes"])
    assert "DIFFER at 0" in captured.err and "WARNING" in captured.err

    assert main([*args, "--strict"]) == 1


def test_bytes_per_token_by_hand_on_a_tiny_mixtral():
    # Mixtral, V=97, D=32, 2 layers, H=4 heads and G=2 kv heads of h=8, E=4 experts of F=16, k=2, float32:
    #   embedding row                    D              = 32
    #   head + final norm                V·D + D        = 3104 + 32 = 3136
    #   per layer: norms                 2·D            = 64
    #              attention             D·H·h + 2·D·G·h + H·h·D = 1024 + 512 + 512 + 1024 = 3072
    #              router                E·D            = 128
    #              the 2 chosen experts  k·3·D·F        = 2·3·32·16 = 3072
    #              layer                                = 64 + 3072 + 128 + 3072 = 6336
    #   elements: 32 + 3136 + 2·6336 = 15840; bytes: 4·15840 = 63360
    config = bench.build_config(bench.FAMILIES["mixtral"], quick=True)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (97, 32, 2)
    parts = bench.weight_bytes_per_token(config, torch.float32)
    assert parts == {"embedding_row": 4 * 32, "head": 4 * 3136, "norms": 4 * 128, "attention": 4 * 6144,
                     "router": 4 * 256, "experts": 4 * 6144, "shared": 0, "dense_ffn": 0, "total": 63360}
    assert bench.weight_bytes_per_token(config, torch.bfloat16)["total"] == 63360 // 2


def read_per_token_from_parameters(model: torch.nn.Module, top_k: int) -> int:
    """The same quantity counted from the model's tensors: every weight once, except the
    routed experts' tensors ([E, ...]: k of E read) and the embedding (one row)."""
    total = 0
    for name, param in model.named_parameters():
        count = param.numel()
        if ".experts." in name:
            count = count // param.shape[0] * top_k
        elif "embed_tokens" in name:
            count = param.shape[1]
        total += count * param.element_size()
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            total += buffer.numel() * buffer.element_size()
    return total


@pytest.mark.parametrize("family", sorted(bench.FAMILIES))
def test_bytes_per_token_formula_matches_the_models_parameters(family):
    spec = bench.FAMILIES[family]
    for quick, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        config = bench.build_config(spec, quick=quick, num_hidden_layers=None if quick else 3)
        model = bench.build_model(config, dtype, device="meta")
        expected = read_per_token_from_parameters(model, config.num_experts_per_tok)
        assert bench.weight_bytes_per_token(config, dtype)["total"] == expected, (family, quick)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_size_models_reach_1_gb_with_the_fewest_layers(dtype):
    for spec in bench.FAMILIES.values():
        config = bench.config_for_target(spec, dtype)
        size = bench.weight_bytes(bench.build_model(config, dtype, device="meta"))
        one_less = bench.build_config(spec, quick=False, num_hidden_layers=config.num_hidden_layers - 1)
        smaller = bench.weight_bytes(bench.build_model(one_less, dtype, device="meta"))
        assert size >= 10**9 > smaller, spec.name


def test_bandwidth_probe_returns_positive_rates():
    rates = bench.memory_bandwidth_gbps(buffer_bytes=2**23, runs=2)
    assert len(rates) == 2 and all(rate > 0 for rate in rates)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--families", "mixtral,nope"], "--families"),
        (["--families", ","], "--families"),
        (["--dtype", "float16"], "--dtype"),
        (["--prompt-tokens", "0"], "--prompt-tokens"),
        (["--new-tokens", "1"], "--new-tokens"),
        (["--rounds", "-2"], "--rounds"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as raised:
        status = main(["bench", "generate", "--quick", *flags])
        raise SystemExit(status)
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert named in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_bench_help_shows_the_generate_example(capsys):
    assert main(["bench", "--help"]) == 0
    assert "moekit bench generate" in capsys.readouterr().out
