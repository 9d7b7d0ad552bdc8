"""Chapter 10's accuracy-vs-visual-tokens sweep, over three training seeds (not part of make test;
about 4-5 min on 2 idle cores).

    python benchmarks/vlm_token_sweep.py     # writes benchmarks/recorded/vlm_token_sweep.json

Average pooling with factors 8, 4, 2, 1 (1, 4, 16, 64 visual tokens) and LDPv2 (16 tokens), each around
its **own** freshly initialised LM, on the frozen zoo encoder ``shapes-vit``, trained with
``shapes-vlm``'s recipe (steps, batch size, learning rate). ``seed`` sets both the initialisation
(``torch.manual_seed``) and the order of the batches (``train_vlm(seed=...)``). The chapter trains seed 0
itself and reads this file for seeds 1 and 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import companion
from companion import vlm, zoo

PER_TYPE = 300
RECORD = Path(__file__).resolve().parent / "recorded" / "vlm_token_sweep.json"
SWEEP = {"pool x8": lambda: vlm.PoolProjector(64, 64, factor=8),
         "pool x4": lambda: vlm.PoolProjector(64, 64, factor=4),
         "pool x2": lambda: vlm.PoolProjector(64, 64, factor=2),
         "pool x1": lambda: vlm.PoolProjector(64, 64, factor=1),
         "ldpv2": lambda: vlm.LDPv2(64, 64)}


def own_lm_vlm(make_projector, seed, encoder, train, tok, features):
    recipe = zoo.recipe_of("shapes-vlm")
    torch.manual_seed(seed)
    model = vlm.build_tiny_vlm(make_projector(), tok, zoo.recipe_of("shapes-vit").vision, recipe.text,
                               vision_tower=encoder.model.tower)
    vlm.train_vlm(model, train, tok, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                  seed=seed, features=features)
    return model.eval()


def main(seeds=(0, 1, 2)) -> None:
    print(companion.setup(seed=0))
    encoder = zoo.load("shapes-vit")
    splits = zoo.recipe_of("shapes-vit").data.splits()
    tok = vlm.shapes_tokenizer()
    features = vlm.vision_features(vlm.build_tiny_vlm("mlp", tok, vision_tower=encoder.model.tower),
                                   splits.train.pixels())
    record = {"per_type": PER_TYPE, "seeds": {}}
    for seed in seeds:
        record["seeds"][str(seed)] = {
            name: vlm.evaluate_vlm(own_lm_vlm(make, seed, encoder, splits.train, tok, features), tok,
                                   splits.test, per_type=PER_TYPE) for name, make in SWEEP.items()}
        print(f"seed {seed}: {json.dumps(record['seeds'][str(seed)])}", flush=True)
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RECORD}")


if __name__ == "__main__":
    main()
