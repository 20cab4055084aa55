"""GGUF export (`optimum_prune.export.gguf`): what the file holds, read back with the `gguf` package's reader.

llama.cpp itself runs the files in `tests/test_gguf_llama_cpp.py` (`make test-gguf`)."""

from __future__ import annotations

import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from test_experts import tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe
from testing_utils import (
    tiny_bloom,
    tiny_gemma,
    tiny_glm,
    tiny_llama,
    tiny_opt,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
)

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.commands.cli import main
from optimum_prune.errors import PruneInputError
from optimum_prune.export import export_gguf
from optimum_prune.export.gguf import FAMILIES, ExpertStacks, gguf_layout, permute_rotary, unpermute_rotary
from optimum_prune.modeling import PrunedLlamaConfig, PrunedLlamaForCausalLM
from optimum_prune.modeling.modeling_pruned_moe import PrunedQwen3MoeConfig, PrunedQwen3MoeForCausalLM


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "examples", "tiny-llama")
VOCAB = 4096  # the example tokenizer's vocabulary
PER_LAYER = {
    "0": {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40},
    "2": {"intermediate_size": 56},
}


def _save(model, path):
    """A checkpoint directory: the model plus the example tokenizer (byte-level BPE, 4096 tokens)."""
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), path / name)
    return path


def _per_layer_llama(seed: int = 0):
    base = tiny_llama(seed, vocab_size=VOCAB).config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        base.pop(key, None)
    torch.manual_seed(seed)
    return PrunedLlamaForCausalLM(PrunedLlamaConfig(**base, per_layer_config=PER_LAYER)).eval()


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader) -> dict:
    """name -> (numpy array in llama.cpp's row-major layout, ggml type name)."""
    return {t.name: (np.array(t.data), t.tensor_type.name) for t in reader.tensors}


def test_dense_llama_metadata_tensors_and_tokenizer(tmp_path):
    model = tiny_llama(vocab_size=VOCAB)
    out = export_gguf(_save(model, tmp_path / "dense"), tmp_path / "dense.gguf")
    reader = gguf.GGUFReader(out)
    fields = _fields(reader)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 3
    assert fields["llama.embedding_length"] == 48
    assert fields["llama.feed_forward_length"] == 80
    assert fields["llama.attention.head_count"] == 8
    assert fields["llama.attention.head_count_kv"] == 4
    assert fields["llama.attention.key_length"] == fields["llama.rope.dimension_count"] == 8
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == VOCAB
    assert fields["tokenizer.ggml.tokens"][0] == "<|endoftext|>"
    assert fields["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.merges"]) > 1000
    assert fields["tokenizer.ggml.eos_token_id"] == 0
    assert fields["tokenizer.ggml.add_bos_token"] is False

    tensors = _tensors(reader)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert len(tensors) == len(state) == 3 * 9 + 3
    assert np.array_equal(tensors["token_embd.weight"][0], state["model.embed_tokens.weight"])
    assert np.array_equal(tensors["blk.1.ffn_down.weight"][0], state["model.layers.1.mlp.down_proj.weight"])
    q, k = tensors["blk.2.attn_q.weight"][0], tensors["blk.2.attn_k.weight"][0]
    assert np.array_equal(unpermute_rotary(q, 8), state["model.layers.2.self_attn.q_proj.weight"])
    assert np.array_equal(unpermute_rotary(k, 4), state["model.layers.2.self_attn.k_proj.weight"])
    assert not np.array_equal(q, state["model.layers.2.self_attn.q_proj.weight"])
    assert {t for _, t in tensors.values()} == {"F32"}


def test_per_layer_widths_use_deci_arrays(tmp_path):
    model = _per_layer_llama()
    out = export_gguf(_save(model, tmp_path / "per-layer"), tmp_path / "per-layer.gguf")
    reader = gguf.GGUFReader(out)
    fields = _fields(reader)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [4, 8, 8]
    assert fields["deci.attention.head_count_kv"] == [2, 4, 4]
    assert fields["deci.feed_forward_length"] == [40, 80, 56]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 8
    tensors = _tensors(reader)
    assert tensors["blk.0.attn_q.weight"][0].shape == (32, 48)
    assert tensors["blk.0.attn_k.weight"][0].shape == (16, 48)
    assert tensors["blk.0.attn_output.weight"][0].shape == (48, 32)
    assert tensors["blk.2.ffn_down.weight"][0].shape == (48, 56)
    q0 = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.array_equal(unpermute_rotary(tensors["blk.0.attn_q.weight"][0], 4), q0)


def _rotate_half_rope(x, position, base=10000.0):
    """Transformers' rotary embedding of one head: channel j pairs with channel j + d/2."""
    half = x.shape[-1] // 2
    theta = position * base ** (-np.arange(half) * 2.0 / x.shape[-1])
    cos, sin = np.cos(theta), np.sin(theta)
    return np.concatenate([x[:half] * cos - x[half:] * sin, x[half:] * cos + x[:half] * sin])


def _adjacent_pairs_rope(x, position, base=10000.0):
    """llama.cpp's normal rope (`llama`, `deci`): channel 2i pairs with channel 2i + 1."""
    theta = position * base ** (-np.arange(x.shape[-1] // 2) * 2.0 / x.shape[-1])
    cos, sin = np.cos(theta), np.sin(theta)
    out = np.empty_like(x)
    out[0::2] = x[0::2] * cos - x[1::2] * sin
    out[1::2] = x[0::2] * sin + x[1::2] * cos
    return out


def test_permutation_turns_rotate_half_into_adjacent_pairs():
    """What llama.cpp computes with the permuted weight is the permuted Transformers query, at every position."""
    rng = np.random.default_rng(0)
    heads, head_dim, hidden = 3, 8, 12
    weight, x = rng.normal(size=(heads * head_dim, hidden)), rng.normal(size=hidden)
    permuted = permute_rotary(weight, heads)
    for position in (0, 1, 7):
        hf = np.concatenate([_rotate_half_rope(h, position) for h in (weight @ x).reshape(heads, head_dim)])
        cpp = np.concatenate([_adjacent_pairs_rope(h, position) for h in (permuted @ x).reshape(heads, head_dim)])
        np.testing.assert_allclose(cpp, permute_rotary(hf, heads), atol=1e-12)
    assert np.array_equal(unpermute_rotary(permuted, heads), weight)
    bias = rng.normal(size=heads * head_dim)
    assert np.array_equal(unpermute_rotary(permute_rotary(bias, heads), heads), bias)


def test_qwen2_keeps_rotate_half_and_biases(tmp_path):
    model = tiny_qwen2(vocab_size=VOCAB)
    reader = gguf.GGUFReader(export_gguf(_save(model, tmp_path / "qwen2"), tmp_path / "qwen2.gguf"))
    assert _fields(reader)["general.architecture"] == "qwen2"
    tensors = _tensors(reader)
    state = model.state_dict()
    assert np.array_equal(tensors["blk.0.attn_q.weight"][0], state["model.layers.0.self_attn.q_proj.weight"].numpy())
    assert np.array_equal(tensors["blk.0.attn_k.bias"][0], state["model.layers.0.self_attn.k_proj.bias"].numpy())


def test_qwen3_metadata_head_norms_and_unpermuted_rotary(tmp_path):
    """llama.cpp's `qwen3`: head size 8 from key_length (8 heads x 8 = 64 query rows on a hidden size of 48), the
    per-head norms as attn_q_norm / attn_k_norm, q/k rows as Transformers has them (NEOX rope rotates halves)."""
    model = tiny_qwen3(vocab_size=VOCAB)
    reader = gguf.GGUFReader(export_gguf(_save(model, tmp_path / "qwen3"), tmp_path / "qwen3.gguf"))
    fields = _fields(reader)
    assert fields["general.architecture"] == "qwen3"
    assert fields["qwen3.block_count"] == 3
    assert fields["qwen3.embedding_length"] == 48
    assert fields["qwen3.feed_forward_length"] == 80
    assert fields["qwen3.attention.head_count"] == 8
    assert fields["qwen3.attention.head_count_kv"] == 4
    assert fields["qwen3.attention.key_length"] == fields["qwen3.attention.value_length"] == 8
    assert fields["qwen3.rope.dimension_count"] == 8
    assert fields["qwen3.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    tensors = _tensors(reader)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert len(tensors) == len(state) == 3 * 11 + 3
    assert {n for n in tensors if n.startswith("blk.0.")} == {
        f"blk.0.{t}.weight"
        for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm")
        + ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    }
    assert tensors["blk.1.attn_q.weight"][0].shape == (64, 48)
    assert tensors["blk.1.attn_output.weight"][0].shape == (48, 64)
    assert tensors["blk.1.attn_q_norm.weight"][0].shape == (8,)
    for hf, cpp in [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.q_norm", "attn_q_norm"),
    ]:
        assert np.array_equal(tensors[f"blk.2.{cpp}.weight"][0], state[f"model.layers.2.{hf}.weight"])
    assert np.array_equal(tensors["blk.0.attn_k_norm.weight"][0], state["model.layers.0.self_attn.k_norm.weight"])


def test_qwen3_per_layer_widths_and_output_bias_refused(tmp_path):
    """llama.cpp's `qwen3` graph builds every layer with layer 0's widths, and loads no attention-output bias."""
    config = tiny_qwen3().config.to_dict()
    config["model_type"] = "pruned_qwen3"
    config["per_layer_config"] = {"1": {"intermediate_size": 40}}
    with pytest.raises(PruneInputError, match=r"`qwen3` graph builds every layer .* prune with uniform=True"):
        gguf_layout(config)
    config["per_layer_config"] = {str(i): {"intermediate_size": 40} for i in range(3)}
    assert gguf_layout(config).ffn == [40, 40, 40] and gguf_layout(config).arch == "qwen3"

    path = _save(tiny_qwen3(vocab_size=VOCAB, attention_bias=True), tmp_path / "bias")
    with pytest.raises(PruneInputError, match=r"`qwen3` graph has no bias on `self_attn.o_proj`"):
        export_gguf(path, tmp_path / "bias.gguf")
    assert not (tmp_path / "bias.gguf").exists()


def test_phi3_fused_qkv_and_gate_up(tmp_path):
    """llama.cpp's `phi3`: qkv_proj as attn_qkv (query, key, value rows) and gate_up_proj as ffn_up (2 x 80 rows),
    unpermuted (NEOX rope), head size 6, the pre-scaling context written."""
    model = tiny_phi3(vocab_size=VOCAB)
    reader = gguf.GGUFReader(export_gguf(_save(model, tmp_path / "phi3"), tmp_path / "phi3.gguf"))
    fields = _fields(reader)
    assert fields["general.architecture"] == "phi3"
    assert fields["phi3.attention.head_count"] == 8 and fields["phi3.attention.head_count_kv"] == 4
    assert fields["phi3.attention.key_length"] == fields["phi3.rope.dimension_count"] == 6
    assert fields["phi3.feed_forward_length"] == 80
    assert fields["phi3.rope.scaling.original_context_length"] == 128
    tensors = _tensors(reader)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert len(tensors) == len(state) == 3 * 6 + 3
    assert tensors["blk.0.attn_qkv.weight"][0].shape == (96, 48)
    assert tensors["blk.0.ffn_up.weight"][0].shape == (160, 48)
    assert "blk.0.ffn_gate.weight" not in tensors
    assert np.array_equal(tensors["blk.2.attn_qkv.weight"][0], state["model.layers.2.self_attn.qkv_proj.weight"])
    assert np.array_equal(tensors["blk.2.ffn_up.weight"][0], state["model.layers.2.mlp.gate_up_proj.weight"])


def test_phi3_name_without_phi3_tokens_is_renamed(tmp_path, caplog):
    """llama.cpp looks up </s>, <unk>, <s> and <|endoftext|> when general.name contains phi3 and fails to load the file
    without them: the example tokenizer has only <|endoftext|>, so the name loses "phi3"."""
    path = _save(tiny_phi3(vocab_size=VOCAB), tmp_path / "my-Phi3-pruned")
    reader = gguf.GGUFReader(export_gguf(path, tmp_path / "m.gguf"))
    assert _fields(reader)["general.name"] == "my-phi-pruned"
    assert "looks up </s>, <unk>, <s>, which this tokenizer lacks" in caplog.text


def test_phi3_pruned_heads_refused():
    """llama.cpp's `phi3` graph sizes the query as the hidden size: MLP-only pruning runs, head pruning cannot."""
    config = tiny_phi3().config.to_dict()
    config["intermediate_size"] = 64
    assert gguf_layout(config).arch == "phi3"
    config.update(num_attention_heads=6, num_key_value_heads=3, head_dim=6)
    with pytest.raises(PruneInputError, match=r"`phi3` graph sizes the query .* \(48\), .* 6 heads x 6"):
        gguf_layout(config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_tensor_names_are_llama_cpps(family):
    """Each family's table gives the names llama.cpp's own converter does (the `gguf` package's tensor map for the
    architecture), and the architecture is one the package knows."""
    spec = FAMILIES[family]
    for arch in {spec.arch, spec.per_layer_arch} - {None}:
        arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
        names = gguf.get_tensor_name_map(arch_enum, 4)

        strip = "transformer." if arch == "bloom" else ""  # llama.cpp's BLOOM converter strips it before the lookup
        for module, name in spec.tensors.items():
            found = names.get_name(f"{spec.layers}.3.{module}".removeprefix(strip))
            assert found == f"blk.3.{name}", (arch, module)
        for hf_name, name in spec.global_tensors.items():
            if name is not None:
                assert names.get_name(hf_name.removeprefix(strip), try_suffixes=(".weight", ".bias")) == name, hf_name
        for template, name in (spec.experts.per_expert if spec.experts else {}).items():
            assert names.get_name(f"{spec.layers}.3.{template.replace('.{}', '')}") == f"blk.3.{name}", template


def test_glm4_sandwich_norms_fused_mlp_and_partial_rotary(tmp_path):
    """llama.cpp's `glm4`: post-attention and post-MLP norms, gate_up_proj as ffn_up, q/k/v biases, rotary over
    half of each head (4 of 8 channels), q/k unpermuted (both rotate interleaved pairs)."""
    model = tiny_glm(glm4=True, vocab_size=VOCAB)
    reader = gguf.GGUFReader(export_gguf(_save(model, tmp_path / "glm4"), tmp_path / "glm4.gguf"))
    fields = _fields(reader)
    assert fields["general.architecture"] == "glm4"
    assert fields["glm4.attention.head_count"] == 6 and fields["glm4.attention.head_count_kv"] == 3
    assert fields["glm4.attention.key_length"] == 8 and fields["glm4.rope.dimension_count"] == 4
    tensors = _tensors(reader)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert len(tensors) == len(state) == 3 * 13 + 3
    assert tensors["blk.0.ffn_up.weight"][0].shape == (160, 48)
    pairs = [
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.bias", "attn_k.bias"),
        ("post_self_attn_layernorm.weight", "post_attention_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("post_mlp_layernorm.weight", "post_ffw_norm.weight"),
    ]
    for hf, cpp in pairs:
        assert np.array_equal(tensors[f"blk.1.{cpp}"][0], state[f"model.layers.1.{hf}"]), cpp


def test_glm_runs_as_chatglm_with_all_heads():
    """Transformers' GLM is llama.cpp's `chatglm` (as its converter maps GlmForCausalLM): rotary over half of each head;
    its attention output is sized as the hidden size, so head pruning is refused."""
    config = tiny_glm().config.to_dict()
    layout = gguf_layout(config)
    assert (layout.arch, layout.head_dim, layout.rope_dim, layout.heads) == ("chatglm", 8, 4, [6, 6, 6])
    config.update(num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(PruneInputError, match=r"`chatglm` graph sizes the query .* 4 heads x 8"):
        gguf_layout(config)


def test_q8_0_quantizes_matrices_and_keeps_norms_f32(tmp_path):
    """Rows of 64 split into q8_0 blocks of 32; rows of 80 (ffn_down) do not and fall back to f16."""
    model = tiny_llama(vocab_size=VOCAB, hidden_size=64, intermediate_size=80)
    reader = gguf.GGUFReader(export_gguf(_save(model, tmp_path / "m"), tmp_path / "m.gguf", outtype="q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert _fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_refuses_opt_with_what_works(tmp_path):
    path = tmp_path / "opt"
    tiny_opt().save_pretrained(path)
    with pytest.raises(
        PruneInputError,
        match=r"LLaMA, Mistral, .*, BLOOM, Gemma 2, Gemma 3, Mixtral, Qwen2-MoE and Qwen3-MoE .* not `opt`: llama.cpp has",
    ):
        export_gguf(path, tmp_path / "opt.gguf")
    assert not (tmp_path / "opt.gguf").exists()


def test_bloom_fused_qkv_reordered_layer_norms_and_no_rope(tmp_path):
    """llama.cpp's `bloom`: BLOOM's per-head [q, k, v] rows regrouped as all q, all k, all v (as its converter does),
    LayerNorm weights and biases (the embedding one too), `layer_norm_epsilon`, no rope keys, tied output."""
    model = tiny_bloom(vocab_size=VOCAB)
    path = tmp_path / "bloom"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), path / name)
    reader = gguf.GGUFReader(export_gguf(path, tmp_path / "bloom.gguf"))
    fields = _fields(reader)
    assert fields["general.architecture"] == "bloom"
    assert fields["bloom.attention.head_count"] == fields["bloom.attention.head_count_kv"] == 6
    assert fields["bloom.feed_forward_length"] == 4 * 48
    assert fields["bloom.attention.layer_norm_epsilon"] == pytest.approx(model.config.layer_norm_epsilon)
    assert not [key for key in fields if ".rope." in key]
    tensors = _tensors(reader)
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert len(tensors) == len(state) and "output.weight" not in tensors
    assert np.array_equal(tensors["token_embd_norm.bias"][0], state["transformer.word_embeddings_layernorm.bias"])
    qkv = state["transformer.h.1.self_attention.query_key_value.weight"].reshape(6, 3, 8, 48)
    assert np.array_equal(
        tensors["blk.1.attn_qkv.weight"][0], np.concatenate([qkv[:, 0], qkv[:, 1], qkv[:, 2]]).reshape(-1, 48)
    )
    bias = state["transformer.h.1.self_attention.query_key_value.bias"].reshape(6, 3, 8)
    assert np.array_equal(tensors["blk.1.attn_qkv.bias"][0], bias.transpose(1, 0, 2).reshape(-1))


def test_bloom_pruned_heads_refused():
    """llama.cpp's `bloom` sizes the query as the hidden size and computes ALiBi slopes from the head count, while
    BLOOM's pruned heads keep their original slopes: MLP-only pruning runs, head pruning cannot."""
    config = tiny_bloom().config.to_dict()
    config.update(model_type="pruned_bloom", intermediate_size=100)
    assert gguf_layout(config).ffn == [100] * config["n_layer"]
    config.update(n_head=4, head_dim=8)
    with pytest.raises(PruneInputError, match=r"`bloom` graph sizes the query .* 4 heads x 8"):
        gguf_layout(config)
    # heads and hidden channels pruned together can match the query width, but not the slopes
    config.update(hidden_size=32, alibi_num_heads=6, alibi_head_indices=[[0, 1, 3, 5]] * 3)
    with pytest.raises(PruneInputError, match=r"original ALiBi slopes, .* from the head count"):
        gguf_layout(config)


def test_refuses_a_layer_without_mlp_channels():
    """llama.cpp's `deci` graph would drop that layer's attention output (it skips the layer when n_ff is 0)."""
    config = tiny_llama().config.to_dict()
    config["per_layer_config"] = {"1": {"intermediate_size": 0}}
    with pytest.raises(PruneInputError, match="Layer 1 has 8 query heads, 4 KV heads and 0 MLP channels"):
        gguf_layout(config)


def test_refuses_existing_file_and_bad_outtype(tmp_path):
    path = _save(tiny_llama(vocab_size=VOCAB), tmp_path / "m")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(PruneInputError, match="exists; pass --overwrite"):
        export_gguf(path, target)
    assert target.read_bytes() == b"keep me"
    with pytest.raises(PruneInputError, match="outtype must be one of f32, f16, bf16, q8_0"):
        export_gguf(path, tmp_path / "other.gguf", outtype="q4_k")
    export_gguf(path, target, overwrite=True)
    assert gguf.GGUFReader(target).fields["general.architecture"].contents() == "llama"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_export_and_refusal(tmp_path, capsys):
    path = _save(_per_layer_llama(), tmp_path / "m")
    args = ["export", "gguf", "--model", str(path), "--output", str(tmp_path / "m.gguf")]
    assert main([*args, "--outtype", "f16"]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == "deci"
    assert {t.tensor_type.name for t in reader.tensors} == {"F16", "F32"}
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"optimum-prune: error: {tmp_path / 'm.gguf'} exists; pass --overwrite (overwrite=True) to replace it."
    ]


def _export(model, tmp_path, name: str, **options):
    """The model saved with the example tokenizer and exported; the GGUF read back as (fields, tensors)."""
    reader = gguf.GGUFReader(export_gguf(_save(model, tmp_path / name), tmp_path / f"{name}.gguf", **options))
    return _fields(reader), _tensors(reader)


def test_gemma2_norms_query_scale_soft_capping_and_sliding_layers(tmp_path):
    """llama.cpp's `gemma2`: every (1 + w) norm stored as 1 + w, the query rows times sqrt(8 / 16) (llama.cpp scales by
    1/sqrt(head_dim), Transformers by 1/sqrt(query_pre_attn_scalar)), both soft-cappings, the window and which layers
    slide, the embeddings as the output."""
    model = tiny_gemma(vocab_size=VOCAB)
    fields, tensors = _export(model, tmp_path, "gemma2")
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert fields["general.architecture"] == "gemma2"
    assert fields["gemma2.attention.head_count"] == 8 and fields["gemma2.attention.key_length"] == 8
    assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(5.0)
    assert fields["gemma2.final_logit_softcapping"] == pytest.approx(3.0)
    assert fields["gemma2.attention.sliding_window"] == 4
    assert fields["gemma2.attention.sliding_window_pattern"] == [False, True, False]
    assert len(tensors) == len(state) and "output.weight" not in tensors
    for hf, cpp in [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
    ]:
        assert np.array_equal(tensors[f"blk.1.{cpp}.weight"][0], state[f"model.layers.1.{hf}.weight"] + 1), cpp
    assert np.array_equal(tensors["output_norm.weight"][0], state["model.norm.weight"] + 1)
    q = state["model.layers.2.self_attn.q_proj.weight"]
    np.testing.assert_allclose(tensors["blk.2.attn_q.weight"][0], q * np.sqrt(0.5), rtol=1e-7)
    assert np.array_equal(tensors["blk.2.attn_k.weight"][0], state["model.layers.2.self_attn.k_proj.weight"])
    assert np.array_equal(tensors["token_embd.weight"][0], state["model.embed_tokens.weight"])


def test_gemma3_head_norms_carry_the_query_scale_and_sliding_rope_base(tmp_path):
    """llama.cpp's `gemma3`: q_norm stored as (1 + w) * sqrt(8 / 16) and the query rows as they are, k_norm as 1 + w,
    the full-attention layers' rotary base and the sliding ones' own, no attention soft-capping."""
    model = tiny_gemma(gemma3=True, vocab_size=VOCAB, attn_logit_softcapping=None, final_logit_softcapping=None)
    fields, tensors = _export(model, tmp_path, "gemma3")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.rope.freq_base"] == pytest.approx(1e6)
    assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(1e4)
    assert fields["gemma3.attention.sliding_window_pattern"] == [False, True, False]
    assert not [key for key in fields if "softcapping" in key]
    q_norm = state["model.layers.0.self_attn.q_norm.weight"]
    np.testing.assert_allclose(tensors["blk.0.attn_q_norm.weight"][0], (q_norm + 1) * np.sqrt(0.5), rtol=1e-7)
    assert np.array_equal(tensors["blk.0.attn_k_norm.weight"][0], state["model.layers.0.self_attn.k_norm.weight"] + 1)
    assert np.array_equal(tensors["blk.0.attn_q.weight"][0], state["model.layers.0.self_attn.q_proj.weight"])


def test_gemma_refusals_say_what_runs():
    """What llama.cpp's gemma graphs cannot express, one line each."""
    gemma2, gemma3 = tiny_gemma().config.to_dict(), tiny_gemma(gemma3=True).config.to_dict()
    assert gguf_layout(gemma2).query_scale == pytest.approx(np.sqrt(0.5))
    with pytest.raises(PruneInputError, match=r"`gemma3` graph has no attention soft-capping, .*=5.0"):
        gguf_layout(gemma3)
    with pytest.raises(PruneInputError, match=r"`gemma2` graph always soft-caps attention and final logits"):
        gguf_layout({**gemma2, "final_logit_softcapping": None})
    with pytest.raises(PruneInputError, match=r"`gemma2` graph reads the embeddings as its output layer"):
        gguf_layout({**gemma2, "tie_word_embeddings": False})
    with pytest.raises(PruneInputError, match=r"`gemma2` graph needs a sliding-window layer .* keep one"):
        gguf_layout({**gemma2, "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2})
    per_layer = {**gemma2, "model_type": "pruned_gemma2", "per_layer_config": {"1": {"intermediate_size": 40}}}
    with pytest.raises(PruneInputError, match=r"`gemma2` graph builds every layer .* prune with uniform=True"):
        gguf_layout(per_layer)
    with pytest.raises(PruneInputError, match=r"`hidden_activation` gelu_pytorch_tanh .* got 'gelu'"):
        gguf_layout({**gemma2, "hidden_activation": "gelu"})


def test_mixtral_experts_stacked_router_f32_and_expert_metadata(tmp_path):
    """Mixtral as llama.cpp's `llama` with experts: w1 / w3 / w2 of every expert stacked into ffn_gate_exps /
    ffn_up_exps / ffn_down_exps ([experts, rows, columns]), the router as ffn_gate_inp (kept f32 in q8_0, as the
    converter keeps it), expert counts and width in the metadata, q/k permuted as LLaMA's."""
    model = tiny_mixtral(vocab_size=VOCAB, hidden_size=64)
    fields, tensors = _export(model, tmp_path, "mixtral", outtype="q8_0")
    assert fields["general.architecture"] == "llama"
    assert fields["llama.expert_count"] == 8 and fields["llama.expert_used_count"] == 2
    assert fields["llama.feed_forward_length"] == fields["llama.expert_feed_forward_length"] == 32
    assert tensors["blk.1.ffn_gate_inp.weight"][1] == "F32" and tensors["blk.1.ffn_gate_exps.weight"][1] == "Q8_0"
    fields, tensors = _export(model, tmp_path, "mixtral-f32")
    experts = model.model.layers[1].mlp.experts
    gate, up = experts.gate_up_proj.detach().numpy().reshape(8, 2, 32, 64).swapaxes(0, 1)
    assert tensors["blk.1.ffn_gate_exps.weight"][0].shape == (8, 32, 64)
    assert np.array_equal(tensors["blk.1.ffn_gate_exps.weight"][0], gate)
    assert np.array_equal(tensors["blk.1.ffn_up_exps.weight"][0], up)
    assert np.array_equal(tensors["blk.1.ffn_down_exps.weight"][0], experts.down_proj.detach().numpy())
    assert np.array_equal(tensors["blk.1.ffn_gate_inp.weight"][0], model.model.layers[1].mlp.gate.weight.detach())
    q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(unpermute_rotary(tensors["blk.1.attn_q.weight"][0], 8), q)
    assert len(tensors) == 3 * 10 + 3  # norms, q/k/v/o, router and three stacks per layer


def test_qwen2_moe_shared_expert_and_pruned_expert_count(tmp_path):
    """Qwen2-MoE as `qwen2moe`: the shared expert's projections and its 1-D sigmoid gate, expert and shared widths;
    experts removed by pruning give the pruned count and the kept experts in the router's order."""
    dense = _save(tiny_qwen2_moe(vocab_size=VOCAB), tmp_path / "qwen2-moe")
    config = PrunerConfig(importance="magnitude", structures=["experts"], pruning_ratio=0.05, uniform=True)
    pruner = AutoPruner.from_pretrained(str(dense), pruner_config=config, dtype=torch.float32)
    pruner.prune(calibration_data=os.path.join(ROOT, "examples", "data", "calibration.txt"))
    model = pruner.model
    fields, tensors = _export(model, tmp_path, "pruned")
    assert fields["general.architecture"] == "qwen2moe"
    assert fields["qwen2moe.expert_count"] == 6 and fields["qwen2moe.expert_used_count"] == 2
    assert fields["qwen2moe.expert_feed_forward_length"] == 32
    assert fields["qwen2moe.expert_shared_feed_forward_length"] == 24
    mlp = model.model.layers[0].mlp
    assert tensors["blk.0.ffn_gate_inp_shexp.weight"][0].shape == (48,)
    assert np.array_equal(tensors["blk.0.ffn_gate_inp_shexp.weight"][0], mlp.shared_expert_gate.weight[0].detach())
    assert np.array_equal(tensors["blk.0.ffn_up_shexp.weight"][0], mlp.shared_expert.up_proj.weight.detach())
    assert np.array_equal(tensors["blk.0.ffn_gate_inp.weight"][0], mlp.gate.weight.detach())
    assert np.array_equal(tensors["blk.0.ffn_down_exps.weight"][0], mlp.experts.down_proj.detach())


def test_fused_experts_of_a_pruned_checkpoint_are_split(tmp_path):
    """A `pruned_qwen3_moe` stores Transformers 5's fused [experts, 2 x width, hidden] gate_up_proj; equal per-layer
    expert counts run on `qwen3moe`, the halves as ffn_gate_exps and ffn_up_exps; unequal ones are refused."""
    base = tiny_qwen3_moe(vocab_size=VOCAB, norm_topk_prob=True).config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        base.pop(key, None)
    equal = {str(i): {"num_experts": 6} for i in range(3)}
    torch.manual_seed(0)
    model = PrunedQwen3MoeForCausalLM(PrunedQwen3MoeConfig(**base, per_layer_config=equal)).eval()
    fields, tensors = _export(model, tmp_path, "fused")
    assert fields["general.architecture"] == "qwen3moe" and fields["qwen3moe.expert_count"] == 6
    gate_up = model.model.layers[2].mlp.experts.gate_up_proj.detach().numpy()
    assert np.array_equal(tensors["blk.2.ffn_gate_exps.weight"][0], gate_up[:, :32])
    assert np.array_equal(tensors["blk.2.ffn_up_exps.weight"][0], gate_up[:, 32:])
    config = {**model.config.to_dict(), "per_layer_config": {"1": {"num_experts": 6}}}
    with pytest.raises(PruneInputError, match=r"`qwen3moe` graph builds every layer .* prune with uniform=True"):
        gguf_layout(config)


def test_moe_refusals_say_what_runs():
    """What llama.cpp's MoE graphs fix: top-k renormalisation per family, every layer sparse, one norm epsilon, and
    (qwen2moe) the query sized as the hidden size."""
    qwen3 = tiny_qwen3_moe().config.to_dict()
    with pytest.raises(PruneInputError, match=r"renormalises the top-k expert weights, .* norm_topk_prob=False"):
        gguf_layout(qwen3)
    qwen3["norm_topk_prob"] = True
    assert gguf_layout(qwen3).widths == {"num_experts": 8, "moe_intermediate_size": 32}
    with pytest.raises(PruneInputError, match=r"every layer sparse, .* dense MLP layers"):
        gguf_layout({**qwen3, "mlp_only_layers": [1]})
    with pytest.raises(PruneInputError, match=r"one epsilon for every norm, .* prune without hidden_channels"):
        gguf_layout({**qwen3, "model_type": "pruned_qwen3_moe", "head_norm_eps": 2e-6})
    qwen2 = tiny_qwen2_moe().config.to_dict()
    with pytest.raises(PruneInputError, match=r"does not renormalise the top-k expert weights"):
        gguf_layout({**qwen2, "norm_topk_prob": True})
    with pytest.raises(PruneInputError, match=r"`qwen2moe` graph sizes the query .* 4 heads x 8"):
        gguf_layout({**qwen2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8})


def test_expert_stacks_need_every_expert():
    stacks = ExpertStacks(3)
    assert stacks.add("blk.0.ffn_up_exps.weight", 2, np.full((2, 4), 2.0)) is None
    assert stacks.add("blk.0.ffn_up_exps.weight", 0, np.zeros((2, 4))) is None
    with pytest.raises(PruneInputError, match=r"expert 3, and the config counts 3 experts"):
        stacks.add("blk.0.ffn_up_exps.weight", 3, np.zeros((2, 4)))
    with pytest.raises(PruneInputError, match=r"lacks experts \[1\] of `blk.0.ffn_up_exps.weight`"):
        stacks.check_complete()
    stacked = stacks.add("blk.0.ffn_up_exps.weight", 1, np.ones((2, 4)))
    assert stacked.shape == (3, 2, 4) and list(stacked[:, 0, 0]) == [0.0, 1.0, 2.0]
