"""Train multi-head (no GQA) variants of the shared tiny models, so that peers that cannot prune grouped-query
attention (FLAP's own code) can run beside ours.

The recipe is the shared one (`../shared/models/train_tiny.py`: its `config_for`, batches and perplexity protocol are
imported; its optimiser and schedule are restated in `run_recipe`, since its `main` cannot be called piecewise); only `num_key_value_heads` is set to `num_attention_heads` (and the
variant's width or depth changed). The shared tokenizer is reused from `../shared/models/tiny-llama`. Weights go to
`benchmarks/checkpoints/` (git-ignored), never into the repository.

    python benchmarks/train_multihead.py                          # tiny-llama-mha, 1600 steps (the shared recipe)
    python benchmarks/train_multihead.py --init-from-gqa --steps 0             # the shared tiny-llama, KV heads copied
    python benchmarks/train_multihead.py --variants tiny-llama-mha tiny-llama-mha-deep --steps 400

The shared models took 1600 steps on a GPU; on two shared CPU cores the full recipe takes hours. `--init-from-gqa`
is the cheap route: it starts from the shared GQA checkpoint with every KV head copied to each query head that reads
it (the same function, now multi-head) and continues the recipe for `--steps` steps at `--lr`, so the copies drift
apart. `training.json` records which route made the weights; say so beside any number.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "data" / "corpus"
TOKENIZER = SHARED / "models" / "tiny-llama"
CHECKPOINTS = ROOT / "benchmarks" / "checkpoints"

logger = logging.getLogger(__name__)

# Variant -> (shared family, config overrides). Every variant has as many KV heads as query heads.
VARIANTS: dict[str, tuple[str, dict]] = {
    "tiny-llama-mha": ("llama", {}),
    "tiny-llama-mha-deep": ("llama", {"num_hidden_layers": 8}),
    "tiny-llama-mha-wide": ("llama", {"hidden_size": 320, "num_attention_heads": 10, "intermediate_size": 880}),
    "tiny-glm-mha": ("glm", {}),
}


def load_recipe():
    """The shared training script as a module (it lives outside the repository and is not a package)."""
    spec = importlib.util.spec_from_file_location("train_tiny", SHARED / "models" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def multihead_config(recipe, variant: str):
    """The shared family's config with the variant's overrides and one KV head per query head."""
    family, overrides = VARIANTS[variant]
    config = recipe.config_for(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.num_key_value_heads = config.num_attention_heads
    return config


def expand_kv_heads(model, source) -> None:
    """Load the GQA checkpoint `source` into the multi-head `model`: each KV head's k/v rows are copied to every query
    head of its group (LLaMA's `repeat_kv`), so the multi-head model computes the same function."""
    state = source.state_dict()
    groups = source.config.num_attention_heads // source.config.num_key_value_heads
    head_dim = source.config.head_dim
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            heads = tensor.reshape(-1, head_dim, *tensor.shape[1:])
            state[name] = heads.repeat_interleave(groups, dim=0).reshape(-1, *tensor.shape[1:])
    model.load_state_dict(state)


def run_recipe(recipe, model, train_ids: torch.Tensor, steps: int, lr: float, batch: int = 16) -> float:
    """The shared recipe's loop: AdamW, 50 warm-up steps, cosine decay to 5%, `batch` x 256-token windows (the recipe
    uses 16), clipping at 1; MoE models add their load-balancing loss. Returns the last step's language-model loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.95 + 0.05,
    )
    windows = recipe.batches(train_ids, batch, torch.Generator().manual_seed(0))
    moe = hasattr(model.config, "router_aux_loss_coef")
    start, lm_loss = time.time(), float("nan")
    model.train()
    for step in range(steps):
        x = next(windows)
        out = model(input_ids=x, labels=x, **({"output_router_logits": True} if moe else {}))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lm_loss = out.loss.item() - (model.config.router_aux_loss_coef * out.aux_loss.item() if moe else 0.0)
        if step % 25 == 0 or step == steps - 1:
            logger.info("step %d loss %.3f %.0fs", step, lm_loss, time.time() - start)
    model.eval()
    return lm_loss


def train(variant: str, steps: int, out_root: Path, lr: float = 2e-3, init_from_gqa: bool = False) -> dict:
    """Train one variant with the shared recipe and save it (bfloat16, like the shared models) with the tokenizer."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    recipe = load_recipe()
    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER)
    train_ids = torch.tensor(tokenizer((CORPUS / "train.txt").read_text())["input_ids"])
    eval_ids = torch.tensor(tokenizer((CORPUS / "eval.txt").read_text())["input_ids"])[: 64 * recipe.SEQ]
    model = AutoModelForCausalLM.from_config(multihead_config(recipe, variant))
    if init_from_gqa:
        family, overrides = VARIANTS[variant]
        if overrides:
            raise SystemExit(f"--init-from-gqa needs a variant of a shared model's own shape, not {variant}")
        source = AutoModelForCausalLM.from_pretrained(SHARED / "models" / f"tiny-{family}", dtype=torch.float32)
        expand_kv_heads(model, source)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %.2fM parameters, %d steps", variant, n_params / 1e6, steps)
    start = time.time()
    if steps:
        run_recipe(recipe, model, train_ids, steps, lr)
    ppl = recipe.perplexity(model, eval_ids)
    out = out_root / variant
    model.to("cpu", torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "variant": variant,
        "parameters": n_params,
        "steps": steps,
        "batch": 16,
        "seq_len": recipe.SEQ,
        "eval_perplexity_first_64_windows": round(ppl, 3),
        "seconds": round(time.time() - start, 1),
        "lr": lr,
        "init": f"shared tiny-{VARIANTS[variant][0]} with KV heads copied per query head"
        if init_from_gqa
        else "random",
        "recipe": "shared/models/train_tiny.py with num_key_value_heads = num_attention_heads",
        "script": "benchmarks/train_multihead.py",
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["tiny-llama-mha"], choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (2e-3 from scratch, 2e-4 with --init-from-gqa)"
    )
    parser.add_argument(
        "--init-from-gqa", action="store_true", help="start from the shared GQA model, KV heads copied"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=str(CHECKPOINTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    for variant in args.variants:
        lr = args.lr or (2e-4 if args.init_from_gqa else 2e-3)
        record = train(variant, args.steps, Path(args.out), lr=lr, init_from_gqa=args.init_from_gqa)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
