"""Demo: prune the small trained LLaMA shipped in examples/ offline and print a before/after table.

Run with `make demo`. It prunes 20% of the parameters (attention KV groups and MLP channels) with uniform widths and
three criteria, then as the defaults do step by step: LLM-Pruner's Taylor importance ranked across layers (widths vary
by layer), then with layer-wise reconstruction (`PrunerConfig(pruning_ratio=0.2)` as it is). It saves that last result
as an ordinary checkpoint, reloads it with plain `AutoModelForCausalLM`, and checks the reloaded logits.
"""

import logging
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner, PrunerConfig, count_parameters, perplexity
from optimum_prune.evaluation import format_table


HERE = Path(__file__).resolve().parent
MODEL = HERE / "tiny-llama"
CALIBRATION = HERE / "data" / "calibration.txt"
EVAL = HERE / "data" / "eval.txt"
RATIO = 0.2


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    rows = []
    base = None
    recipes = {
        "random, uniform": {"importance": "random"},
        "magnitude, uniform": {"importance": "magnitude"},
        "taylor, uniform": {"importance": "taylor", "global_ranking": False, "reconstruction": False},
        "taylor, global ranking": {"importance": "taylor", "reconstruction": False},
        "default (+ reconstruction)": {},
    }
    for name, recipe in recipes.items():
        config = PrunerConfig(pruning_ratio=RATIO, **recipe)
        pruner = AutoPruner.from_pretrained(MODEL, pruner_config=config, dtype=torch.float32)
        if base is None:
            base = {
                "parameters": count_parameters(pruner.model),
                "ppl": perplexity(pruner.model, EVAL, pruner.tokenizer),
            }
            rows.append(["unpruned", f"{base['parameters']:,}", "-", f"{base['ppl']:.2f}", "1.00"])
        model = pruner.prune(calibration_data=CALIBRATION)
        ppl = perplexity(model, EVAL, pruner.tokenizer)
        params = count_parameters(model)
        rows.append(
            [
                name,
                f"{params:,}",
                f"{1 - params / base['parameters']:.1%}",
                f"{ppl:.2f}",
                f"{ppl / base['ppl']:.2f}",
            ]
        )
        if not recipe:
            with tempfile.TemporaryDirectory() as tmp:
                pruner.save_pretrained(tmp)
                reloaded = AutoModelForCausalLM.from_pretrained(tmp)
                ids = torch.arange(32).unsqueeze(0)
                with torch.no_grad():
                    same = torch.equal(reloaded(ids).logits, model(ids).logits)
                saved_type = reloaded.config.model_type
    print(f"\nStructured pruning of {MODEL.name} ({RATIO:.0%} of total parameters: KV groups + MLP channels)")
    print("perplexity on examples/data/eval.txt (64 windows x 256 tokens)\n")
    print(format_table(["criterion", "parameters", "removed", "perplexity", "ratio"], rows))
    print(f"\nSaved + reloaded the default model with AutoModelForCausalLM ({saved_type}): identical logits = {same}")


if __name__ == "__main__":
    main()
