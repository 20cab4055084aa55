"""Small trained models of the families the shared models do not cover (Qwen3, Phi-3, Gemma 3 text, Mixtral,
Qwen3-MoE, Qwen2-MoE), so that `benchmarks/quality.py` measures pruning on trained weights, not random ones.

The shared models took 1600 steps on a GPU; on two shared CPU cores that is hours per model. Every model here therefore
starts from the shared tiny-llama (`../shared/models/tiny-llama`, trained with `../shared/models/train_tiny.py`) by a
cheap route and continues the shared recipe (its batches and data; AdamW, 50 warm-up steps, cosine decay to 5% of the
peak, clipping at 1) for a few hundred steps on the CPU. Each model's `training.json` records its route, steps, batch,
learning rate, seconds and perplexity; say so beside any number measured on it. Weights go to `benchmarks/checkpoints/`
(git-ignored), never into the repository.

    python benchmarks/train_families.py --threads 1                 # all six, in dependency order
    python benchmarks/train_families.py --models tiny-qwen3 tiny-qwen3-moe --steps 250 --batch 8 --threads 1
    python benchmarks/train_families.py --routing tiny-mixtral tiny-qwen3-moe   # routing shares of trained MoEs

Routes (shapes of the shared recipe: hidden 256, 6 layers, 8 query heads in 4 KV groups, head_dim 32, vocab 4096):

- tiny-phi3: tiny-llama with q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj` (the same function, no
  training by default).
- tiny-qwen3: tiny-llama plus per-head `q_norm` / `k_norm`, initialised to the mean per-head RMS of tiny-llama's
  queries / keys on training text (so the scores keep their scale), then trained.
- tiny-gemma3: tiny-llama converted to Gemma 3 text: embeddings divided by sqrt(256) (Gemma multiplies them back),
  `(1 + w)` norms, SwiGLU -> GeGLU (gate rows / 1.702, down x 1.702, since silu(x) ~ 1.702 gelu(x / 1.702)), q/k norms
  and the post-attention / post-MLP norms initialised to the measured RMS of what they normalise, rope base 10000 on
  both layer types, sliding window 128 on layers 0-4 (layer 5 global), then trained.
- tiny-mixtral: tiny-llama's MLP split into 8 experts of 88 channels (MoEfication: expert e owns channels
  88e..88e+87; down projection scaled by sqrt(experts x top_k) so a top-2 output keeps the dense MLP's norm), a random
  router, top-2, then trained with the load-balancing loss (coefficient 0.001) so the router learns.
- tiny-qwen3-moe: tiny-qwen3's attention and q/k norms, its MLP's 640 strongest channels (|up row| x |down column|)
  split into 16 experts of 40 channels, a random router, top-4 with `norm_topk_prob=True` (as Qwen3-30B-A3B), then
  trained like tiny-mixtral. Needs tiny-qwen3 first.
- tiny-qwen2-moe: tiny-llama with zero q/k/v biases; each MLP's 192 strongest channels become the shared expert (its
  down projection x 2 beside a zero `shared_expert_gate`, whose sigmoid is 1/2: no bias to push it to 1), the other
  512 are split into 16 experts of 32 (down scaled by sqrt(16 / 4) x 16, the routing weight being ~1/16 without
  top-k normalisation), a random router, top-4 without `norm_topk_prob` (as Qwen1.5-MoE-A2.7B), then trained like
  tiny-mixtral.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, also when this file is loaded by path
from train_multihead import CHECKPOINTS, CORPUS, SHARED, load_recipe, run_recipe  # noqa: E402


TINY_LLAMA = SHARED / "models" / "tiny-llama"

logger = logging.getLogger(__name__)


def _common(source_config) -> dict:
    """The shapes every model here shares with tiny-llama."""
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    common = {name: getattr(source_config, name) for name in names}
    common.update(
        head_dim=source_config.head_dim,
        max_position_embeddings=source_config.max_position_embeddings,
        rms_norm_eps=source_config.rms_norm_eps,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return common


@torch.no_grad()
def measure_rms(model, batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean RMS (over tokens, and heads for q/k) of each layer's queries, keys, attention output and MLP output."""
    sums: dict[str, list[float]] = {}
    head_dim = model.config.head_dim
    hooks = []

    def record(name: str, per_head: bool):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if per_head:
                out = out.reshape(*out.shape[:-1], -1, head_dim)
            sums.setdefault(name, []).append(out.float().pow(2).mean(-1).sqrt().mean().item())

        return hook

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_hook(record(f"{i}.q", True)))
        hooks.append(layer.self_attn.k_proj.register_forward_hook(record(f"{i}.k", True)))
        hooks.append(layer.self_attn.register_forward_hook(record(f"{i}.attn", False)))
        hooks.append(layer.mlp.register_forward_hook(record(f"{i}.mlp", False)))
    model.eval()
    for x in batches:
        model(input_ids=x)
    for hook in hooks:
        hook.remove()
    return {name: sum(values) / len(values) for name, values in sums.items()}


def to_phi3(llama):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        **_common(llama.config),
        intermediate_size=llama.config.intermediate_size,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )
    model = Phi3ForCausalLM(config)
    state = {}
    for name, tensor in llama.state_dict().items():
        if ".q_proj." in name:
            prefix = name.replace("q_proj.weight", "")
            k, v = (llama.state_dict()[f"{prefix}{p}_proj.weight"] for p in "kv")
            state[f"{prefix}qkv_proj.weight"] = torch.cat([tensor, k, v])
        elif ".gate_proj." in name:
            up = llama.state_dict()[name.replace("gate_proj", "up_proj")]
            state[name.replace("gate_proj", "gate_up_proj")] = torch.cat([tensor, up])  # Phi-3 chunks gate first
        elif not any(f".{p}_proj." in name for p in ("k", "v", "up")):
            state[name] = tensor
    model.load_state_dict(state)
    return model, "shared tiny-llama, q/k/v fused into qkv_proj and gate/up into gate_up_proj (the same function)"


def to_qwen3(llama, rms: dict[str, float]):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **_common(llama.config),
        intermediate_size=llama.config.intermediate_size,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
    )
    model = Qwen3ForCausalLM(config)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all("_norm" in name for name in missing), (missing, unexpected)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_norm.weight.fill_(rms[f"{i}.q"])
            layer.self_attn.k_norm.weight.fill_(rms[f"{i}.k"])
    return model, "shared tiny-llama plus q_norm/k_norm set to the mean per-head RMS of its queries/keys"


def to_gemma3(llama, rms: dict[str, float]):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    config = Gemma3TextConfig(
        **_common(llama.config),
        intermediate_size=llama.config.intermediate_size,
        query_pre_attn_scalar=llama.config.head_dim,  # LLaMA's 1/sqrt(head_dim)
        sliding_window=128,
        rope_parameters={"sliding_attention": dict(rope), "full_attention": dict(rope)},
        hidden_activation="gelu_pytorch_tanh",
    )
    model = Gemma3ForCausalLM(config)
    source = llama.state_dict()
    state = {}
    for name, tensor in source.items():
        if name.endswith("norm.weight"):
            tensor = tensor - 1  # Gemma's norms multiply by (1 + w)
            name = name.replace("post_attention_layernorm", "pre_feedforward_layernorm")
        elif name == "model.embed_tokens.weight":
            tensor = tensor / config.hidden_size**0.5  # Gemma scales embeddings by sqrt(hidden)
        elif "gate_proj" in name:
            tensor = tensor / 1.702
        elif "down_proj" in name:
            tensor = tensor * 1.702
        state[name] = tensor
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for norm, key in (
            ("self_attn.q_norm", "q"),
            ("self_attn.k_norm", "k"),
            ("post_attention_layernorm", "attn"),
            ("post_feedforward_layernorm", "mlp"),
        ):
            size = config.head_dim if norm.startswith("self_attn") else config.hidden_size
            state[f"{prefix}{norm}.weight"] = torch.full((size,), rms[f"{i}.{key}"] - 1)
    model.load_state_dict(state)
    return model, (
        "shared tiny-llama converted (embeddings / 16, (1 + w) norms, GeGLU with gate / 1.702 and down x 1.702, q/k and "
        "post-attention/post-MLP norms at the measured RMS, sliding window 128 on layers 0-4)"
    )


def moefy(dense, moe, channels: list[torch.Tensor], num_experts: int, top_k: int, seed: int, **extra) -> None:
    """Copy `dense` into `moe`, its MLPs as `moe_mlps` makes them (`extra` is passed on); biases `dense` lacks are zero."""
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    state.update(moe_mlps(dense, channels, num_experts, top_k, seed, **extra))
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(name.endswith("_proj.bias") for name in missing), (missing, unexpected)
    with torch.no_grad():
        for name in missing:  # attention biases the dense model lacks (Qwen2-MoE's q/k/v) start at zero
            moe.get_parameter(name).zero_()


def moe_mlps(
    dense, channels, num_experts: int, top_k: int, seed: int, weight: float | None = None, shared=None
) -> dict[str, torch.Tensor]:
    """The MoE MLPs' state: layer i's MLP channels `channels[i]` (in order) split into `num_experts` equal experts
    (gate/up rows, down columns), down scaled by sqrt(num_experts / top_k) / `weight` (the routing weight a chosen
    expert gets at first: 1 / top_k by default, as `norm_topk_prob` gives) so that a top-k output keeps the dense
    MLP's norm; routers random (std 0.02). `shared[i]`, if given, are layer i's channels for a shared expert, its down
    projection x 2 beside a zero `shared_expert_gate` (sigmoid 1/2: the same function as those dense channels)."""
    source = dense.state_dict()
    state = {}
    width = channels[0].numel() // num_experts
    scale = math.sqrt(num_experts / top_k) / (weight or 1 / top_k)
    for i in range(dense.config.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp."
        gate_proj, up_proj = source[f"{mlp}gate_proj.weight"], source[f"{mlp}up_proj.weight"]
        down_proj = source[f"{mlp}down_proj.weight"]
        gate, up = gate_proj[channels[i]], up_proj[channels[i]]
        down = down_proj[:, channels[i]] * scale
        gate, up = gate.view(num_experts, width, -1), up.view(num_experts, width, -1)
        state[f"{mlp}experts.gate_up_proj"] = torch.cat([gate, up], dim=1)  # each expert chunks gate first
        state[f"{mlp}experts.down_proj"] = down.view(down.shape[0], num_experts, width).permute(1, 0, 2).contiguous()
        generator = torch.Generator().manual_seed(seed + i)
        state[f"{mlp}gate.weight"] = torch.randn(num_experts, dense.config.hidden_size, generator=generator) * 0.02
        if shared is not None:
            state[f"{mlp}shared_expert.gate_proj.weight"] = gate_proj[shared[i]]
            state[f"{mlp}shared_expert.up_proj.weight"] = up_proj[shared[i]]
            state[f"{mlp}shared_expert.down_proj.weight"] = down_proj[:, shared[i]] * 2
            state[f"{mlp}shared_expert_gate.weight"] = torch.zeros(1, dense.config.hidden_size)
    return state


def strongest_channels(mlp, count: int) -> torch.Tensor:
    """The MLP's `count` strongest channels (|up row| x |down column|), in their original order."""
    strength = mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
    return strength.argsort(descending=True)[:count].sort().values


def to_mixtral(llama):
    from transformers import MixtralConfig, MixtralForCausalLM

    experts, top_k = 8, 2
    width = llama.config.intermediate_size // experts
    config = MixtralConfig(
        **_common(llama.config),
        intermediate_size=width,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=0.001,
    )
    model = MixtralForCausalLM(config)
    moefy(llama, model, [torch.arange(experts * width)] * config.num_hidden_layers, experts, top_k, seed=1)
    return (
        model,
        f"shared tiny-llama, MLP split into {experts} experts of {width} channels, random router, top-{top_k}",
    )


def to_qwen3_moe(qwen3):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    experts, top_k, width = 16, 4, 40
    config = Qwen3MoeConfig(
        **_common(qwen3.config),
        intermediate_size=qwen3.config.intermediate_size,  # dense layers only; every layer here is sparse
        moe_intermediate_size=width,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=0.001,
    )
    model = Qwen3MoeForCausalLM(config)
    channels = [strongest_channels(layer.mlp, experts * width) for layer in qwen3.model.layers]
    moefy(qwen3, model, channels, experts, top_k, seed=2)
    return model, (
        f"tiny-qwen3 (this script), each MLP's {experts * width} strongest channels split into {experts} experts of "
        f"{width}, random router, top-{top_k}, norm_topk_prob"
    )


def to_qwen2_moe(llama, experts: int = 16, top_k: int = 4, shared: int = 192):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    width = (llama.config.intermediate_size - shared) // experts
    config = Qwen2MoeConfig(
        **_common(llama.config),
        intermediate_size=llama.config.intermediate_size,  # dense layers only; every layer here is sparse
        moe_intermediate_size=width,
        shared_expert_intermediate_size=shared,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,  # as Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=0.001,
    )
    model = Qwen2MoeForCausalLM(config)
    strong = [strongest_channels(layer.mlp, shared) for layer in llama.model.layers]
    everything = torch.arange(llama.config.intermediate_size)
    rest = [everything[~torch.isin(everything, s)][: experts * width] for s in strong]
    moefy(llama, model, rest, experts, top_k, seed=3, weight=1 / experts, shared=strong)
    return model, (
        f"shared tiny-llama, each MLP's {shared} strongest channels as the shared expert (zero shared_expert_gate, "
        f"down x 2), the other {experts * width} split into {experts} experts of {width}, random router, top-{top_k} "
        "without norm_topk_prob, zero q/k/v biases"
    )


@dataclass(frozen=True)
class Route:
    """How a model is made: `convert(source[, rms])` from `source` (tiny-llama, or a model this script trains first;
    `rms`: `measure_rms` of the source on training text), then `steps` at peak `lr`."""

    convert: Callable
    steps: int
    lr: float
    source: str = "tiny-llama"
    rms: bool = False


# Batches of 8 x 256 tokens by default (the recipe uses 16): twice the steps for the same CPU time. In dependency order.
ROUTES: dict[str, Route] = {
    "tiny-phi3": Route(to_phi3, 0, 5e-4),
    "tiny-qwen3": Route(to_qwen3, 150, 5e-4, rms=True),
    "tiny-gemma3": Route(to_gemma3, 150, 5e-4, rms=True),
    "tiny-mixtral": Route(to_mixtral, 250, 1e-3),
    "tiny-qwen3-moe": Route(to_qwen3_moe, 250, 1e-3, source="tiny-qwen3"),
    "tiny-qwen2-moe": Route(to_qwen2_moe, 250, 1e-3),
}


def build(name: str, out_root: Path, rms_batches: list[torch.Tensor]):
    from transformers import AutoModelForCausalLM

    route = ROUTES[name]
    path = TINY_LLAMA if route.source == "tiny-llama" else out_root / route.source
    if not path.exists():
        raise SystemExit(f"{name} starts from {path}: train {route.source} first")
    source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return route.convert(source, *([measure_rms(source, rms_batches)] if route.rms else []))


def train(name: str, steps: int, lr: float, batch: int, out_root: Path) -> dict:
    """Build `name` by its route, continue the recipe for `steps`, save it in bfloat16 (like the shared models) with the
    shared tokenizer and a training.json."""
    from transformers import PreTrainedTokenizerFast

    from optimum_prune import perplexity

    recipe = load_recipe()
    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TINY_LLAMA)
    train_ids = torch.tensor(tokenizer((CORPUS / "train.txt").read_text())["input_ids"])
    eval_text = (CORPUS / "eval.txt").read_text()
    windows = recipe.batches(train_ids, 8, torch.Generator().manual_seed(1))
    model, init = build(name, out_root, [next(windows) for _ in range(4)])
    n_params = sum(p.numel() for p in model.parameters())
    ppl_init = perplexity(model, eval_text, tokenizer)
    logger.info("%s: %.2fM parameters, eval perplexity %.2f at init, %d steps", name, n_params / 1e6, ppl_init, steps)
    start = time.time()
    loss = run_recipe(recipe, model, train_ids, steps, lr, batch) if steps else None
    seconds = time.time() - start
    model.to("cpu", torch.bfloat16)
    model.config.use_cache = True
    out = out_root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The saved bfloat16 weights, read back in float32: what quality.py measures.
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    record = {
        "model": name,
        "model_type": model.config.model_type,
        "parameters": n_params,
        "init": init,
        "eval_perplexity_at_init": round(ppl_init, 3),
        "steps": steps,
        "batch": batch,
        "seq_len": recipe.SEQ,
        "lr": lr,
        "last_train_loss": None if loss is None else round(loss, 4),
        "eval_perplexity": round(perplexity(saved, eval_text, tokenizer), 3),
        "eval_protocol": "optimum_prune.perplexity on shared/data/corpus/eval.txt, 64 windows of 256 tokens",
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "recipe": "shared/models/train_tiny.py batches and schedule (50 warm-up steps, cosine to 5%), AdamW",
        "script": "benchmarks/train_families.py",
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


@torch.no_grad()
def routing_shares(name: str, out_root: Path, windows: int = 32, seq_len: int = 128) -> list[list[float]]:
    """Per layer, each expert's share of the router's (token, slot) choices on the first `windows` x `seq_len` tokens
    of calibration.txt (quality.py's calibration windows), busiest first."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(out_root / name, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out_root / name)
    ids = tokenizer((CORPUS / "calibration.txt").read_text())["input_ids"][: windows * seq_len]
    counts = {}

    def hook(index):
        def record(module, args, output):
            chosen = torch.bincount(output[2].flatten(), minlength=module.num_experts)
            counts[index] = counts.get(index, 0) + chosen

        return record

    hooks = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    model(input_ids=torch.tensor(ids).view(windows, seq_len))
    for handle in hooks:
        handle.remove()
    return [(c / c.sum()).sort(descending=True).values.tolist() for _, c in sorted(counts.items())]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ROUTES), choices=list(ROUTES))
    parser.add_argument("--steps", type=int, default=None, help="steps per model (default: the model's own)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's own)")
    parser.add_argument("--batch", type=int, default=8, help="windows of 256 tokens per step (the recipe uses 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=str(CHECKPOINTS))
    parser.add_argument("--routing", nargs="+", metavar="MOE_MODEL", help="print routing shares of trained MoE models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.routing:
        for name in args.routing:
            for layer, shares in enumerate(routing_shares(name, Path(args.out))):
                half = sum(shares[: len(shares) // 2])
                print(f"{name} layer {layer}: busiest half {half:.1%}, shares {[round(x, 3) for x in shares]}")
        return
    for name in args.models:
        route = ROUTES[name]
        steps = route.steps if args.steps is None else args.steps
        record = train(name, steps, args.lr or route.lr, args.batch, Path(args.out))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
