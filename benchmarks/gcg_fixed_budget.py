"""Chapter 05's fair comparison: random search at a *fixed* budget on every held-out vault-code holder of
both guards (``guarded-chat`` and ``guarded-chat-noise``); not part of make test (about 4 min per guard on
2 cores, more than the chapter's runtime budget allows).

    python benchmarks/gcg_fixed_budget.py      # writes benchmarks/recorded/gcg_fixed_budget.json

The chapter's GCG runs stop at 60 steps of 128 candidates, which costs at most ``1 + 60 * (128 + 3)``
forward-pass equivalents (the initial score, then per step the candidates that pass the retokenisation
filter, one forward and one backward pass for the gradient, a backward pass counted as two forward
passes). Random search here gets that whole cap, whatever GCG spent on the holder, so the budget is not
chosen by either method's outcome: 128 candidates per step, 2 contiguous tokens changed, early stop on
success (greedy decoding would start with the target), seed 0, the chapter's request, target and suffix
initialisation. Its cost at success (``budget[success_step]``) gives the time-to-success that the chapter
plots against GCG's (censored at the cap when it never succeeds). Every final suffix is then sent as a
user message and the greedy reply (24 new tokens) is judged by the refusal, target and secret judges.
The chapter reads the record, checks that its settings and models match its own, and re-runs one holder
live.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import companion
from companion import gcg, zoo
from companion.chat_data import guarded_chat_data
from companion.generation import attack_success, chat_prompt_ids, generate_batch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gcg_noise_guard import INIT, N_CHANGE, RS_CONFIG, _cpu, _summary, heldout_attacks  # noqa: E402  (the same settings)

RECORD = HERE / "recorded" / "gcg_fixed_budget.json"
MODELS = ("guarded-chat", "guarded-chat-noise")
GCG_STEPS, GCG_WIDTH = 60, 128
BUDGET = 1 + GCG_STEPS * (GCG_WIDTH + 3)  # GCG's cost at its 60-step cap, at most


def main() -> None:
    print(companion.setup(seed=0))
    chats = guarded_chat_data()
    holders, requests, targets = heldout_attacks(chats)
    record = {"budget": BUDGET, "rs_config": dataclasses.asdict(RS_CONFIG), "n_change": N_CHANGE,
              "init": INIT, "requests": requests, "targets": targets,
              "machine": {"cpu": _cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__},
              "models": {}}
    started = time.perf_counter()
    for name in MODELS:
        loaded = zoo.load(name)
        model, tok = loaded.model, loaded.tokenizer
        entry = {"entry": zoo.entry_folder(name).name, "recipe": loaded.card["recipe"], "holders": {}}
        for n in holders:
            t0 = time.perf_counter()
            search = gcg.random_search(model, tok, requests[n], targets[n], RS_CONFIG, n_change=N_CHANGE,
                                       budget=BUDGET)
            summary = _summary(search, time.perf_counter() - t0)
            reply = generate_batch(model, tok, [chat_prompt_ids(tok, requests[n] + summary["best_string"])])[0]
            summary["reply"] = reply
            summary["judges"] = {"refusal": attack_success([reply], "refusal")[0],
                                 "target": attack_success([reply], "target", [targets[n]])[0],
                                 "secret": attack_success([reply], "secret", [chats.secrets[n]])[0]}
            entry["holders"][n] = summary
            print(f"{name} {n}: random search {summary['steps']} steps, budget {search.budget[-1]},"
                  f" success step {search.success_step} {summary['judges']} {summary['seconds']:.1f} s",
                  flush=True)
        entry["seconds"] = round(sum(h["seconds"] for h in entry["holders"].values()), 1)
        record["models"][name] = entry
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    record["date"] = time.strftime("%Y-%m-%d")
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RECORD} ({record['total_seconds']} s)")


if __name__ == "__main__":
    main()
