"""Time per unlearning step for each method of chapter 02, and the retrain oracles' training time.

    python benchmarks/unlearning_steps.py

Each method (and the retain-only control) runs 20 steps on the 10% forget set of ``qa-llama`` (16 forget +
16 retain sequences per step; GA and the control, which have one term, 32 of their one set: equal budgets);
the oracles' time is read from their zoo card (the time it took to train them, with its thread count).
"""

from __future__ import annotations

import copy
import time


def main() -> None:
    import companion
    from companion import unlearning, zoo

    print(companion.setup(seed=0))
    base = zoo.load("qa-llama")
    tok, qa = base.tokenizer, zoo.recipe_of("qa-llama").qa_data()
    forget = unlearning.qa_sequences(tok, qa.facts_of(qa.forget_people("forget10")))
    retain = unlearning.qa_sequences(tok, qa.facts_of(qa.retain_people("forget10")))
    for method in unlearning.METHODS + unlearning.CONTROLS:
        model = copy.deepcopy(base.model)
        started = time.perf_counter()
        _, log = unlearning.unlearn(model, forget, retain, method, steps=20, lr=1e-4, reference=base.model,
                                    pad_id=tok.pad_token_id)
        seconds = time.perf_counter() - started
        print(f"{method:>11}: {1000 * seconds / 20:6.1f} ms per step "
              f"({log.passes[0] // 20} sequences forward+backward, {log.passes[1] // 20} reference forward)")
    print(f"qa-llama fine-tune: {base.card['train_seconds']} s on {base.card['threads']} thread(s)")
    card = zoo.load("qa-llama-oracles").card
    for split, seconds in card["seconds_per_model"].items():
        print(f"oracle {split}: {seconds:.1f} s on {card['threads']} thread(s)")


if __name__ == "__main__":
    main()
