"""Generation: sampling rules, the timed loop, and generation from a local transformers folder.

The folder is built here: ``save_pretrained`` of a random tiny Mixtral plus a byte-level BPE
tokenizer trained with the ``tokenizers`` library on a few sentences (no hub, no downloads).
Greedy text from the patched folder equals transformers' own greedy ``generate`` of the
unpatched model; bfloat16 runs; seeded sampling repeats; bad input is refused by name.

    pytest tests/test_inference.py
"""

from __future__ import annotations

import pytest
import torch

from moekit import matvec
from moekit.inference import SamplingConfig, sample_next_token, timed_generate
from moekit.interop.hf import ConversionError
from moekit.interop.patch import generate_from_folder, load_patched_folder

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "Sparse mixture of experts layers route each token to a few experts.",
    "The router picks the top k experts and the outputs are combined by weight.",
    "Shared experts see every token, routed experts see only their own.",
    "Capacity limits how many tokens one expert may take in a batch.",
]


def byte_level_bpe() -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_mixtral")
    tokenizer = byte_level_bpe()
    tokenizer.save(str(path / "tokenizer.json"))
    config = transformers.MixtralConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, bos_token_id=None, pad_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(path)
    return path


PROMPT = "The router picks"


def test_greedy_text_from_folder_equals_transformers_generate(folder):
    result, patched = generate_from_folder(folder, PROMPT, max_new_tokens=24)

    assert [record.family for record in patched] == ["mixtral", "mixtral"]
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt_ids = tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        want = reference.generate(
            torch.tensor([prompt_ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False
        )[0, len(prompt_ids) :].tolist()
    assert result.tokens == want and len(set(want)) >= 4
    assert result.text == tokenizer.decode(want) and result.text
    assert result.prompt_tokens == len(prompt_ids)
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    assert not result.stopped_at_eos
    assert set(result.to_dict()) >= {"text", "prefill_tokens_per_s", "decode_tokens_per_s"}


def test_bfloat16_generation_runs_in_bfloat16(folder):
    model, _, patched = load_patched_folder(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(patched) == 2
    result, _ = generate_from_folder(folder, PROMPT, max_new_tokens=8, dtype="bfloat16")
    assert len(result.tokens) == 8


def test_seeded_sampling_repeats_and_top_p_limits_the_choice(folder):
    sampling = SamplingConfig(greedy=False, temperature=1.5, top_p=0.9, seed=7)
    first, _ = generate_from_folder(folder, PROMPT, max_new_tokens=12, sampling=sampling)
    second, _ = generate_from_folder(folder, PROMPT, max_new_tokens=12, sampling=sampling)
    assert first.tokens == second.tokens
    greedy, _ = generate_from_folder(folder, PROMPT, max_new_tokens=12)
    assert first.tokens != greedy.tokens


def test_generation_stops_at_the_eos_token():
    eos = 3

    def step(input_ids, cache):  # a model that always predicts the eos token
        logits = torch.zeros(1, 5)
        logits[0, eos] = 1.0
        return logits, cache

    result = timed_generate(step, [1, 2], 10, SamplingConfig(), eos_token_ids=(eos,))
    assert result.tokens == [eos] and result.stopped_at_eos and result.decode_tokens_per_s == 0.0


def test_top_p_keeps_the_smallest_nucleus_and_always_the_best_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = {
        int(sample_next_token(logits, SamplingConfig(greedy=False, top_p=0.7), torch.Generator().manual_seed(s)))
        for s in range(200)
    }
    assert picks == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    tiny = {
        int(sample_next_token(logits, SamplingConfig(greedy=False, top_p=0.01), torch.Generator().manual_seed(s)))
        for s in range(50)
    }
    assert tiny == {0}
    assert int(sample_next_token(logits, SamplingConfig())) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, r"temperature=0.0 .*> 0"),
        ({"temperature": float("nan")}, r"temperature=nan"),
        ({"top_p": 0.0}, r"top_p=0.0 .*\(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5"),
    ],
)
def test_bad_sampling_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_bad_folder_dtype_and_lengths_are_refused(folder, tmp_path):
    with pytest.raises(ValueError, match=r"dtype='float16' is invalid: .*bfloat16"):
        load_patched_folder(folder, dtype="float16")
    with pytest.raises(ConversionError, match=r"config.json: missing"):
        load_patched_folder(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ConversionError, match=r"tokenizer.json: missing"):
        load_patched_folder(tmp_path)
    with pytest.raises(ValueError, match=r"max_new_tokens=0"):
        generate_from_folder(folder, PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompt='' encodes to no tokens"):
        generate_from_folder(folder, "", max_new_tokens=4)


# ---------------------------------------------------------------------------------------
# The MoE layer's decode fast path (eval, a handful of tokens): gathered expert weights
# ---------------------------------------------------------------------------------------

FAST_PATH_CONFIGS = {
    "mixtral": dict(),
    "gelu": dict(activation="gelu"),
    "switch": dict(router="switch", top_k=1, activation="relu"),
    "deepseek_v3": dict(router="aux_free", n_group=4, topk_group=2, num_shared_experts=1, routed_scaling_factor=2.0),
    "qwen2_moe": dict(num_shared_experts=1, shared_expert_gate=True, normalize_weights=False),
    "gpt_oss": dict(activation="clamped_swiglu", router_bias=True, expert_biases=True, swiglu_limit=0.5),
}


def _layer_and_normal_path_calls(overrides: dict, dtype: torch.dtype, d_model: int = 64, d_ff: int = 96):
    from moekit import MoE, MoEConfig

    config = MoEConfig(**{"d_model": d_model, "d_ff": d_ff, "num_experts": 8, "top_k": 2, **overrides})
    torch.manual_seed(0)
    layer = MoE(config).to(dtype).eval()
    with torch.no_grad():
        for param in layer.parameters():  # biases start at 0: make them matter
            param.add_(torch.randn_like(param) * 0.1)
    calls = []
    plan = layer.dispatcher.plan
    layer.dispatcher.plan = lambda *args: calls.append(1) or plan(*args)  # counts normal-path forwards
    return layer, calls


@pytest.fixture
def torch_matmuls():
    """moekit.matvec off: every product through torch's matmul, as the normal path's are."""
    previous = matvec.set_enabled(False)
    yield
    matvec.set_enabled(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(FAST_PATH_CONFIGS))
def test_decode_fast_path_equals_the_normal_path_exactly(family, dtype, torch_matmuls):
    layer, calls = _layer_and_normal_path_calls(FAST_PATH_CONFIGS[family], dtype)
    assert layer.decode_fast_path_tokens == 1
    for seed in range(4):
        x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)
        with torch.no_grad():
            fast = layer(x)
            fast_stats = layer.last_stats
            assert calls == []  # the fast path made no dispatch plan
            layer.decode_fast_path_tokens = 0
            normal = layer(x)
            layer.decode_fast_path_tokens = 1
        assert calls == [1]
        calls.clear()
        assert torch.equal(fast, normal)
        assert torch.equal(fast_stats.tokens_per_expert_E, layer.last_stats.tokens_per_expert_E)


@pytest.mark.skipif(not matvec.available(), reason=f"moekit.matvec is {matvec.status()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(FAST_PATH_CONFIGS))
def test_decode_fast_path_through_matvec_equals_the_normal_path_to_rounding(family, dtype, monkeypatch):
    """With the streaming kernels the fast path sums in another order: equal to rounding, the
    same experts chosen. (Experts large enough for matvec: w_out [256, 128].) The token's k
    experts and their weighted sum are one C call (``experts_ffn``); with the plain top-k
    router (Mixtral, GELU, Qwen2-MoE, GPT-OSS) the router too (``route_experts_ffn``)."""
    layer, calls = _layer_and_normal_path_calls(FAST_PATH_CONFIGS[family], dtype, d_model=128, d_ff=256)
    kernel_calls = []
    experts_ffn, route_experts_ffn = matvec.experts_ffn, matvec.route_experts_ffn
    monkeypatch.setattr(
        matvec, "experts_ffn", lambda x, w_in, w_out, experts, *rest: kernel_calls.append(experts)
        or experts_ffn(x, w_in, w_out, experts, *rest)
    )

    def routed(*args):
        result = route_experts_ffn(*args)
        kernel_calls.append(result.expert_idx_K.tolist())
        return result

    monkeypatch.setattr(matvec, "route_experts_ffn", routed)
    one_call_router = family in ("mixtral", "gelu", "qwen2_moe", "gpt_oss")
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for seed in range(4):
        x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(seed)).to(dtype)
        with torch.no_grad():
            kernel_calls.clear()
            fast = layer(x)
            # one call for the token's k experts
            assert len(kernel_calls) == 1 and len(kernel_calls[0]) == layer.config.top_k
            assert layer._one_call_decode_applies(x.reshape(1, -1), None) == one_call_router
            fast_stats = layer.last_stats
            layer.decode_fast_path_tokens = 0
            normal = layer(x)
            layer.decode_fast_path_tokens = 1
        assert calls == [1]
        calls.clear()
        torch.testing.assert_close(fast, normal, **tolerance)
        assert torch.equal(fast_stats.tokens_per_expert_E, layer.last_stats.tokens_per_expert_E)


@pytest.mark.parametrize("family", sorted(FAST_PATH_CONFIGS))
def test_decode_fast_path_for_a_few_tokens_equals_the_normal_path_to_rounding(family):
    layer, calls = _layer_and_normal_path_calls(FAST_PATH_CONFIGS[family], torch.float32)
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        layer.decode_fast_path_tokens = 4
        fast = layer(x)
        layer.decode_fast_path_tokens = 0
        normal = layer(x)
    assert calls == [1]
    torch.testing.assert_close(fast, normal, atol=1e-6, rtol=1e-6)


def test_decode_fast_path_is_only_for_eval_dropless_few_tokens():
    layer, calls = _layer_and_normal_path_calls({}, torch.float32)
    layer.decode_fast_path_tokens = 4
    with torch.no_grad():
        layer(torch.randn(1, 5, 64))  # more tokens than decode_fast_path_tokens
        layer(torch.randn(1, 2, 64), token_mask=torch.tensor([[True, False]]))
        layer.train()(torch.randn(1, 2, 64))
    assert calls == [1, 1, 1]
    capped, calls = _layer_and_normal_path_calls({"eval_capacity_factor": 1.0}, torch.float32)
    with torch.no_grad():
        capped(torch.randn(1, 1, 64))
    assert calls == [1]


def test_moekit_sample_runs_a_transformers_folder(folder, capsys):
    import json

    from moekit.cli.main import main

    expected, _ = generate_from_folder(folder, PROMPT, max_new_tokens=12)
    assert main(["sample", str(folder), "--prompt", PROMPT, "--tokens", "12", "--greedy", "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)  # the whole of stdout is the JSON document
    assert payload["text"] == expected.text and payload["patched_blocks"] == 2
    assert payload["prefill_tokens_per_s"] > 0 and payload["decode_tokens_per_s"] > 0
    assert main(["sample", str(folder), "--prompt", PROMPT, "--tokens", "4", "--top-k", "5"]) == 2
    assert "--top-k applies to moekit runs" in capsys.readouterr().err
    assert main(["sample", str(folder), "--prompt", PROMPT, "--tokens", "4", "--top-p", "1.5"]) == 2
    assert "--top-p 1.5 is invalid" in capsys.readouterr().err


def test_moekit_sample_of_a_run_reports_prefill_and_decode_speed_in_bfloat16(tmp_path, capsys):
    import json

    from moekit.cli.main import main
    from moekit.config import MoEConfig
    from moekit.models.lm import LMConfig
    from moekit.training.config import TrainConfig
    from moekit.training.trainer import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 80)
    config = LMConfig(seq_len=32, n_layer=1, n_head=2, d_model=32, moe=MoEConfig(d_model=32, d_ff=32, num_experts=4))
    train(config, TrainConfig(data=str(corpus), steps=2, batch_size=4, max_minutes=None, device="cpu"),
          tmp_path / "run", progress=False)
    assert main(["sample", str(tmp_path / "run"), "--prompt", "To", "--tokens", "8", "--greedy", "--dtype",
                 "bfloat16", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["dtype"] == "bfloat16" and len(payload["samples"]) == 1
    assert payload["prefill_tokens_per_s"] > 0 and payload["decode_tokens_per_s"] > 0
    assert main(["sample", str(tmp_path / "run"), "--prompt", "To", "--top-p", "0.9"]) == 2


@pytest.mark.skipif(not matvec.available(), reason=f"moekit.matvec is {matvec.status()}")
def test_the_one_call_layer_is_taken_only_where_it_computes_what_the_layer_would():
    """A decoded token's router and experts in one C call (``MoE._one_call_decode``): only in
    eval, for the plain top-k router, with its ``route`` not replaced, experts large enough for
    moekit.matvec; a NaN input still raises."""
    from moekit import MoE, MoEConfig
    from moekit.routing import NonFiniteRouterLogitsError

    def layer(**overrides):
        config = MoEConfig(**{"d_model": 128, "d_ff": 256, "num_experts": 8, "top_k": 2, **overrides})
        return MoE(config).eval()

    x_TD = torch.randn(1, 128)
    with torch.no_grad():
        plain = layer()
        assert plain._one_call_decode_applies(x_TD, None)
        assert not plain._one_call_decode_applies(torch.randn(2, 128), None)  # two tokens
        assert not plain._one_call_decode_applies(x_TD, 1.25)  # a capacity to enforce
        plain.route = lambda x, capacity_factor: MoE.route(plain, x, capacity_factor)  # e.g. a routing replay
        assert not plain._one_call_decode_applies(x_TD, None)
        assert not layer(router="aux_free")._one_call_decode_applies(x_TD, None)
        assert not layer(n_group=4, topk_group=2, group_score="max")._one_call_decode_applies(x_TD, None)
        assert not layer(d_model=64, d_ff=96)._one_call_decode_applies(torch.randn(1, 64), None)  # torch's ops
        training = layer().train()
        assert not training._one_call_decode_applies(x_TD, None)
        with pytest.raises(NonFiniteRouterLogitsError, match="NaN or inf"):
            layer()(torch.full((1, 1, 128), float("nan")))
