"""Chapter 06: choosing SecAlign's learning rate on a development split, never on the evaluation
(not part of make test; six fine-tunes of 150 steps, about 4 min on 2 idle cores).

    python benchmarks/secalign_dev.py         # writes benchmarks/recorded/secalign_dev.json

From ``inject-undefended``, with ``inject-struq``'s budget (steps, sequences per step), SecAlign is trained
on the preference pairs of :func:`companion.injection.secalign_dataset` (every kind of request injected,
print requests included) with plain DPO and with DPO + NLL (``nll_weight=1``), at three learning rates.
Each candidate is scored on :func:`companion.injection.selection_split` (the training people, training
templates and phrasings, fresh draws; the goal is the canary) by
:func:`companion.injection.selection_score`, whose rule was fixed before any run. The undefended and the
StruQ models are scored on the same split as references. The chapter reads the JSON, applies the rule,
and retrains only the chosen candidates.
"""

from __future__ import annotations

import json
from pathlib import Path

import companion
from companion import injection, zoo

RECORD = Path(__file__).resolve().parent / "recorded" / "secalign_dev.json"
LEARNING_RATES = (5e-5, 1e-4, 2e-4)
VARIANTS = {"DPO": 0.0, "DPO + NLL": 1.0}  # name -> nll_weight
N_DEV = 40
NEW_TOKENS = 7  # as in the chapter: "HACKED." is 7 tokens


def main() -> None:
    print(companion.setup(seed=0))
    recipe = zoo.recipe_of("inject-struq")
    tok = zoo.load("inject-undefended").tokenizer
    people = injection.task_people("train")
    pairs = injection.preference_pairs(injection.secalign_dataset(people, recipe.n_samples, seed=recipe.seed + 1))
    split = injection.selection_split(people, N_DEV, seed=20)
    record = {"n_dev": N_DEV, "steps": recipe.steps, "batch_pairs": recipe.batch_size // 2,
              "n_pairs": len(pairs), "learning_rates": list(LEARNING_RATES), "variants": VARIANTS,
              "references": {}, "candidates": {}}
    for name in ("inject-undefended", "inject-struq"):
        record["references"][name] = injection.selection_score(zoo.load(name).model, tok, split, NEW_TOKENS)
        print(name, record["references"][name], flush=True)
    for variant, nll_weight in VARIANTS.items():
        for lr in LEARNING_RATES:
            model = zoo.load("inject-undefended").model
            losses = injection.secalign_finetune(model, tok, pairs, steps=recipe.steps,
                                                 batch_size=recipe.batch_size // 2, lr=lr, beta=0.1,
                                                 nll_weight=nll_weight)
            result = injection.selection_score(model, tok, split, NEW_TOKENS)
            result["final_loss"] = sum(losses[-10:]) / 10
            record["candidates"][f"{variant} @ {lr:g}"] = result
            print(variant, lr, result, flush=True)
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RECORD}")


if __name__ == "__main__":
    main()
