"""ChatGLM2/3 and GLM-4 remote-code checkpoints (`model_type: "chatglm"`): exact conversion to native `glm`, pruning
through `AutoPruner.from_pretrained`, and a stock `glm` output that reloads with no remote code.

The ChatGLM checkpoints are built here from tiny native GLMs through the inverse of the conversion. That alone would
only prove the two mappings consistent, so the logits are also checked against `chatglm_reference_logits`, an
independent re-implementation of the equations of THUDM's `modeling_chatglm.py` (seq-first layout, its rope cache
and interleaved-pair `apply_rotary_pos_emb`, swiglu over `chunk(2)`) that shares no code with Transformers' GLM.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from testing_utils import fresh_process_logits, input_ids, logits, tiny_glm
from transformers import AutoModelForCausalLM

import optimum_prune
from optimum_prune import AutoPruner, PrunerConfig, convert_chatglm_checkpoint
from optimum_prune.architectures.chatglm import (
    chatglm_to_glm_config,
    convert_chatglm_state_dict,
    detect_rope_ratio_mode,
    load_chatglm_checkpoint,
)


# A modeling file that would leave a trace if anything imported it: the remote code must never run.
_TRAP = """import pathlib
pathlib.Path(__file__).with_name("REMOTE_CODE_RAN").write_text("{name}")
raise RuntimeError("remote code ran")
# {rope_line}
"""
_ROPE_LINES = {
    "base": "base = base * self.rope_ratio",
    "positions": "seq_idx = torch.arange(seq_len) / self.rope_ratio",
}


def glm_to_chatglm(model, multi_query: bool = True, rope_ratio: float = 1.0):
    """The inverse mapping: (config.json dict, state dict) of the ChatGLM2/3 remote layout for a native GLM."""
    c = model.config
    heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    if not multi_query and kv_heads != heads:
        raise ValueError("Without multi-query attention ChatGLM has as many KV heads as query heads.")
    config = {
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "model_type": "chatglm",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": c.intermediate_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": c.hidden_size,
        "kv_channels": head_dim,
        "layernorm_epsilon": c.rms_norm_eps,
        "multi_query_attention": multi_query,
        "multi_query_group_num": kv_heads,
        "num_attention_heads": heads,
        "num_layers": c.num_hidden_layers,
        "original_rope": True,
        "padded_vocab_size": c.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": c.max_position_embeddings,
        "rope_ratio": rope_ratio,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    sd = model.state_dict()
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.rotary_pos_emb.inv_freq": 1.0
        / 10000 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2)),
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv")
            if multi_query:
                fused = torch.cat([q, k, v])
            else:  # per head [q | k | v]
                fused = torch.stack([t.reshape(heads, head_dim, *t.shape[1:]) for t in (q, k, v)], dim=1)
                fused = fused.reshape(3 * heads * head_dim, *q.shape[1:])
            out[f"{dst}self_attention.query_key_value.{kind}"] = fused
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "self_attention.dense.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = sd[src + "mlp.gate_up_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.down_proj.weight"]
    return config, {k: v.clone().contiguous() for k, v in out.items()}


def write_chatglm(path, config, state_dict, fmt="safetensors", shards=1, rope_mode="base"):
    """config.json + weights (safetensors or pickle, optionally sharded with an index) + trap remote-code files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("modeling_chatglm.py", "configuration_chatglm.py"):
        (path / name).write_text(_TRAP.format(name=name, rope_line=_ROPE_LINES[rope_mode]))
    names = sorted(state_dict)
    chunks = [names[i::shards] for i in range(shards)]
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    files = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for file, chunk in zip(files, chunks):
        part = {k: state_dict[k] for k in chunk}
        save_file(part, str(path / file)) if fmt == "safetensors" else torch.save(part, path / file)
    if shards > 1:
        weight_map = {k: file for file, chunk in zip(files, chunks) for k in chunk}
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# An independent ChatGLM forward, after THUDM's modeling_chatglm.py -----------------------------------------------------


def _chatglm_rope_cache(seq_len, rot_dim, base, rope_ratio_positions=1.0):
    """RotaryEmbedding.forward_impl: [seq, rot_dim // 2, 2] of (cos, sin), frequency base ** (-2i / rot_dim)."""
    theta = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
    seq_idx = torch.arange(seq_len, dtype=torch.float) / rope_ratio_positions
    idx_theta = torch.outer(seq_idx, theta).float()
    return torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)


def _chatglm_apply_rope(x, rope_cache, half_split=False):
    """apply_rotary_pos_emb on x [sq, b, np, hn]: interleaved pairs (x[2i], x[2i + 1]) of the first rot_dim channels.

    `half_split=True` pairs x[i] with x[i + rot_dim / 2] instead (the NeoX / LLaMA convention): the negative control
    showing that a convention mismatch would be caught."""
    sq, b, np_, _ = x.shape
    rot_dim = rope_cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    cos, sin = rope_cache[:sq, None, None, :, 0], rope_cache[:sq, None, None, :, 1]  # [sq, 1, 1, rot_dim / 2]
    if half_split:
        x0, x1 = x[..., : rot_dim // 2], x[..., rot_dim // 2 :]
        out = torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    else:
        pairs = x.reshape(sq, b, np_, rot_dim // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3)
    return torch.cat((out, x_pass), dim=-1)


def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def chatglm_reference_logits(config, sd, ids, half_split=False, rope_ratio_mode="base"):
    """Logits [b, s, vocab] of ChatGLM2/3 computed from its config.json and remote-layout state dict."""
    heads, head_dim, layers = config["num_attention_heads"], config["kv_channels"], config["num_layers"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    eps, ratio = config["layernorm_epsilon"], config.get("rope_ratio", 1.0)
    base = 10000 * ratio if rope_ratio_mode == "base" else 10000
    seq = ids.shape[1]
    cache = _chatglm_rope_cache(seq, head_dim // 2, base, 1.0 if rope_ratio_mode == "base" else ratio)
    p = "transformer."
    h = F.embedding(ids, sd[p + "embedding.word_embeddings.weight"]).transpose(0, 1)  # [s, b, hidden]
    for i in range(layers):
        lp = f"{p}encoder.layers.{i}."
        x = _rms_norm(h, sd[lp + "input_layernorm.weight"], eps)
        mixed = F.linear(
            x, sd[lp + "self_attention.query_key_value.weight"], sd[lp + "self_attention.query_key_value.bias"]
        )
        if config["multi_query_attention"]:
            q, k, v = mixed.split([heads * head_dim, groups * head_dim, groups * head_dim], dim=-1)
            q = q.view(seq, -1, heads, head_dim)
            k, v = k.view(seq, -1, groups, head_dim), v.view(seq, -1, groups, head_dim)
        else:
            q, k, v = mixed.view(seq, -1, heads, 3 * head_dim).split(head_dim, dim=-1)
        q, k = _chatglm_apply_rope(q, cache, half_split), _chatglm_apply_rope(k, cache, half_split)
        k = k.repeat_interleave(heads // groups, dim=2)  # each group serves a block of consecutive query heads
        v = v.repeat_interleave(heads // groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, np, s, hn]
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
        context = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(seq, -1, heads * head_dim)
        h = h + F.linear(context, sd[lp + "self_attention.dense.weight"])
        x = _rms_norm(h, sd[lp + "post_attention_layernorm.weight"], eps)
        gate, up = F.linear(x, sd[lp + "mlp.dense_h_to_4h.weight"]).chunk(2, dim=-1)
        h = h + F.linear(F.silu(gate) * up, sd[lp + "mlp.dense_4h_to_h.weight"])
    h = _rms_norm(h, sd[p + "encoder.final_layernorm.weight"], eps)
    return F.linear(h, sd[p + "output_layer.weight"]).transpose(0, 1)


def _rope_theta(config):
    """Transformers 5.x keeps the base in `rope_parameters`, 4.x in `rope_theta`."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))


# Tests -----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("multi_query", "shards"), [(True, 1), (True, 3), (False, 1)], ids=["mqa", "mqa-sharded", "per-head-qkv"]
)
def test_conversion_is_exact(tmp_path, multi_query, shards):
    native = tiny_glm() if multi_query else tiny_glm(num_key_value_heads=6)
    config, sd = glm_to_chatglm(native, multi_query=multi_query)
    path = write_chatglm(tmp_path / "chatglm", config, sd, shards=shards)
    converted = load_chatglm_checkpoint(path)
    ids = input_ids()
    assert converted.config.model_type == "glm" and converted.dtype == torch.float32
    assert converted.config.num_key_value_heads == native.config.num_key_value_heads
    torch.testing.assert_close(logits(converted, ids), logits(native, ids), atol=0, rtol=0)
    for name, tensor in native.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert not (path / "REMOTE_CODE_RAN").exists()


def test_native_glm_computes_what_chatglm_computes():
    """The rotary convention and every other equation, against the independent ChatGLM forward; a half-split
    (NeoX-style) rotary in that forward gives different logits, so a convention mismatch would fail this test."""
    native = tiny_glm()
    config, sd = glm_to_chatglm(native)
    ids = input_ids(length=16)
    want = logits(native, ids)
    torch.testing.assert_close(chatglm_reference_logits(config, sd, ids), want, atol=1e-5, rtol=1e-5)
    assert (chatglm_reference_logits(config, sd, ids, half_split=True) - want).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["base", "positions"])
def test_rope_ratio(tmp_path, mode):
    """ChatGLM3 / GLM-4 scale the rope base by `rope_ratio`, ChatGLM2-32k divides the positions by it; the mode is
    read from the text of modeling_chatglm.py."""
    config, sd = glm_to_chatglm(tiny_glm(), rope_ratio=4.0)
    path = write_chatglm(tmp_path / "chatglm", config, sd, rope_mode=mode)
    converted = load_chatglm_checkpoint(path)
    if mode == "base":
        assert _rope_theta(converted.config) == 40000.0
    ids = input_ids(length=16)
    want = chatglm_reference_logits(config, sd, ids, rope_ratio_mode=mode)
    torch.testing.assert_close(logits(converted, ids), want, atol=1e-5, rtol=1e-5)
    other = "positions" if mode == "base" else "base"
    assert (chatglm_reference_logits(config, sd, ids, rope_ratio_mode=other) - want).abs().max() > 1e-4
    assert not (path / "REMOTE_CODE_RAN").exists()


def test_rope_ratio_mode_required_when_undetectable():
    config, _ = glm_to_chatglm(tiny_glm(), rope_ratio=4.0)
    with pytest.raises(ValueError, match="rope_ratio_mode"):
        chatglm_to_glm_config(config)
    assert _rope_theta(chatglm_to_glm_config(config, rope_ratio_mode="base")) == 40000.0
    assert detect_rope_ratio_mode("nothing here") is None


def test_autopruner_prunes_chatglm_to_stock_glm(tmp_path):
    """`AutoPruner.from_pretrained` on a ChatGLM directory converts, prunes and saves a stock `glm` checkpoint that
    loads in a fresh process with the package hidden and no remote code."""
    native = tiny_glm()
    config, sd = glm_to_chatglm(native)
    path = write_chatglm(tmp_path / "chatglm", config, sd, shards=2)
    pruner_config = PrunerConfig(importance="magnitude", pruning_ratio=0.2)
    pruner = AutoPruner.from_pretrained(path, pruner_config, dtype=torch.float32)
    assert pruner.model.config.model_type == "glm"

    # The same pruning of the native model gives the same plan and the same logits.
    reference = AutoPruner.from_model(native, PrunerConfig(importance="magnitude", pruning_ratio=0.2))
    reference.prune()
    pruned = pruner.prune()
    assert pruner.plan.to_dict() == reference.plan.to_dict()
    ids = input_ids()
    want = logits(pruned, ids)
    torch.testing.assert_close(want, logits(reference.model, ids), atol=0, rtol=0)
    assert pruned.config.num_key_value_heads < 3 or pruned.config.intermediate_size < 80
    generated = pruned.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7)

    out = tmp_path / "pruned"
    pruner.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "glm" and "auto_map" not in saved
    assert not list(out.glob("*.py"))
    ((got, cls),) = fresh_process_logits([out], ids, trust_remote_code=False, import_package=False)
    assert cls == "GlmForCausalLM"
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not (path / "REMOTE_CODE_RAN").exists()


@pytest.mark.parametrize("structure", ["attention_heads", "mlp_channels", "hidden_channels", "layers"])
def test_every_structure_prunes_as_the_native_model(tmp_path, structure):
    """Each structure through the ChatGLM path gives the plan and logits of pruning the native model directly (whose
    exactness against the zeroed reference is checked in test_families.py for `glm`)."""
    native = tiny_glm()
    ratio = {"attention_heads": 0.1, "mlp_channels": 0.2, "hidden_channels": 0.2}.get(structure)
    if structure == "layers":  # exactly one decoder layer's share of the parameters
        per_layer = sum(p.numel() for p in native.model.layers[0].parameters())
        ratio = round(per_layer / sum(p.numel() for p in native.parameters()), 3)
    config, sd = glm_to_chatglm(native)
    path = write_chatglm(tmp_path / "chatglm", config, sd)
    pruner = AutoPruner.from_pretrained(
        path, PrunerConfig(importance="magnitude", pruning_ratio=ratio, structures=[structure])
    )
    reference = AutoPruner.from_model(
        native, PrunerConfig(importance="magnitude", pruning_ratio=ratio, structures=[structure])
    )
    ids = input_ids()
    torch.testing.assert_close(logits(pruner.prune(), ids), logits(reference.prune(), ids), atol=0, rtol=0)
    assert pruner.plan.to_dict() == reference.plan.to_dict()
    assert pruner.params_after < pruner.params_before


def test_standard_tokenizer_beside_chatglm_weights_loads_without_remote_code(tmp_path, monkeypatch):
    """A tokenizer with a stock class loads; the config's `auto_map` is neither run nor prompted for."""
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config, sd = glm_to_chatglm(tiny_glm())
    path = write_chatglm(tmp_path / "chatglm", config, sd)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(path)
    pruner = AutoPruner.from_pretrained(path, PrunerConfig(importance="magnitude"))
    assert pruner.tokenizer is not None and pruner.tokenizer("w5 w7")["input_ids"] == [5, 7]
    assert not prompts, "asked whether to run the checkpoint's remote code"
    assert not (path / "REMOTE_CODE_RAN").exists()


def test_cli_prunes_a_chatglm_directory(tmp_path):
    """`optimum-prune prune --model <chatglm dir>` goes through the same conversion."""
    config, sd = glm_to_chatglm(tiny_glm())
    path = write_chatglm(tmp_path / "chatglm", config, sd)
    out = tmp_path / "out"
    root = os.path.dirname(os.path.dirname(os.path.abspath(optimum_prune.__file__)))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    args = ["prune", "--model", str(path), "--importance", "magnitude", "--pruning-ratio", "0.2", "--output", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "optimum_prune.commands.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "glm" and "auto_map" not in saved
    assert not (path / "REMOTE_CODE_RAN").exists()


def test_cli_prunes_a_disk_offloaded_chatglm_in_place(tmp_path):
    """With `--device-map` putting modules on disk, a ChatGLM directory (converted when loaded, so its shards cannot be
    streamed) is pruned in place and gives what the in-memory run gives."""
    from optimum_prune.commands.cli import main as cli_main

    config, sd = glm_to_chatglm(tiny_glm())
    path = write_chatglm(tmp_path / "chatglm", config, sd)
    args = ["prune", "--model", str(path), "--importance", "magnitude", "--pruning-ratio", "0.2"]
    offload = ["--device-map", "auto", "--max-memory", "cpu=1000", "--offload-folder", str(tmp_path / "offload")]
    assert cli_main([*args, *offload, "--output", str(tmp_path / "offloaded")]) == 0
    assert cli_main([*args, "--output", str(tmp_path / "in_memory")]) == 0
    offloaded, in_memory = (
        AutoModelForCausalLM.from_pretrained(tmp_path / name).eval() for name in ("offloaded", "in_memory")
    )
    assert offloaded.config.model_type == "glm"
    torch.testing.assert_close(logits(offloaded, input_ids()), logits(in_memory, input_ids()), atol=1e-5, rtol=0)
    assert not (path / "REMOTE_CODE_RAN").exists()


def test_convert_chatglm_checkpoint_writes_stock_glm(tmp_path):
    native = tiny_glm()
    config, sd = glm_to_chatglm(native)
    dst = convert_chatglm_checkpoint(write_chatglm(tmp_path / "chatglm", config, sd), tmp_path / "glm")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert type(loaded).__name__ == "GlmForCausalLM" and not list((tmp_path / "glm").glob("*.py"))
    torch.testing.assert_close(logits(loaded, input_ids()), logits(native, input_ids()), atol=0, rtol=0)


def test_dtype_follows_the_checkpoint_unless_given(tmp_path):
    native = tiny_glm()
    config, sd = glm_to_chatglm(native)
    path = write_chatglm(tmp_path / "chatglm", config, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    assert load_chatglm_checkpoint(path).dtype == torch.bfloat16
    upcast = load_chatglm_checkpoint(path, dtype="float32")
    assert upcast.dtype == torch.float32
    want = native.model.embed_tokens.weight.to(torch.bfloat16).float()
    torch.testing.assert_close(upcast.model.embed_tokens.weight, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="`dtype` must be a torch dtype"):
        load_chatglm_checkpoint(path, dtype="float33")


@pytest.mark.parametrize("shards", [1, 2])
def test_pickled_weights_need_allow_pickle(tmp_path, shards):
    native = tiny_glm()
    config, sd = glm_to_chatglm(native)
    path = write_chatglm(tmp_path / "chatglm", config, sd, fmt="bin", shards=shards)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_chatglm_checkpoint(path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        AutoPruner.from_pretrained(path, PrunerConfig(importance="magnitude"))
    converted = load_chatglm_checkpoint(path, allow_pickle=True)
    torch.testing.assert_close(logits(converted, input_ids()), logits(native, input_ids()), atol=0, rtol=0)


def test_chatglm_v1_is_refused_naming_what_is_supported(tmp_path):
    v1_config = {
        "model_type": "chatglm",
        "hidden_size": 48,
        "inner_hidden_size": 192,
        "num_attention_heads": 6,
        "num_layers": 2,
        "position_encoding_2d": True,
        "vocab_size": 97,
    }
    weights = {"transformer.layers.0.attention.query_key_value.weight": torch.zeros(144, 48)}
    path = tmp_path / "chatglm-6b"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(v1_config))
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"ChatGLM-6B \(v1\).*Supported: ChatGLM2-6B, ChatGLM3-6B and GLM-4"):
        AutoPruner.from_pretrained(path, PrunerConfig(importance="magnitude"))
    # The tensor layout alone is recognised too (a v2-looking config with v1 names).
    config, _ = glm_to_chatglm(tiny_glm())
    with pytest.raises(ValueError, match=r"ChatGLM-6B \(v1\)"):
        convert_chatglm_state_dict(weights, config)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rmsnorm", False),
        ("add_bias_linear", True),
        ("apply_residual_connection_post_layernorm", True),
        ("post_layer_norm", False),
        ("pre_seq_len", 8),
        ("quantization_bit", 4),
    ],
)
def test_unsupported_chatglm_variants_are_refused(field, value):
    config, _ = glm_to_chatglm(tiny_glm())
    with pytest.raises(ValueError, match=f"`{field}: .*Supported:"):
        chatglm_to_glm_config({**config, field: value})


def test_unexpected_or_missing_tensors_are_refused():
    config, sd = glm_to_chatglm(tiny_glm())
    with pytest.raises(ValueError, match="Unexpected tensors"):
        convert_chatglm_state_dict({**sd, "transformer.prefix_encoder.embedding.weight": torch.zeros(1)}, config)
    del sd["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    with pytest.raises(ValueError, match="lacks tensors"):
        convert_chatglm_state_dict(sd, config)


def test_from_model_on_a_chatglm_model_points_to_from_pretrained():
    model = tiny_glm()
    model.config.model_type = "chatglm"  # what a trust_remote_code ChatGLM model reports
    with pytest.raises(ValueError, match="AutoPruner.from_pretrained"):
        AutoPruner.from_model(model, PrunerConfig(importance="magnitude"))
