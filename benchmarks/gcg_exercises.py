"""Chapter 05's exercise solutions at a small setting, recorded because they cost more than the chapter's
runtime budget allows (about 3-4 min on 2 cores; not part of make test).

    python benchmarks/gcg_exercises.py      # writes benchmarks/recorded/gcg_exercises.json

``width`` (exercise ex05-width): GCG on ``guarded-chat`` with search widths 32, 128 and 256 (top-64) and
top-k 8 (width 128), each at the same budget in forward-pass equivalents (at most 30 steps of width 128:
``1 + 30 * (128 + 3)``; the number of steps is the budget over one step's cost), early stop, seed 0, on
the first ``N_WIDTH`` held-out holders: success, cost to success, wall time.

``transfer`` (exercise ex05-transfer): a third guard ``guarded-chat-seed2`` (the chapter's recipe with
fine-tuning seed 2) is trained; on the first ``N_TRANSFER`` held-out holders, a single-model suffix (GCG on
``guarded-chat``, the chapter's settings) and an ensemble suffix (one suffix optimised on ``guarded-chat``
and ``guarded-chat-seed1`` together: summed row-normalised one-hot gradients, the mean of the two
models' losses, ``ENSEMBLE_STEPS`` steps of 128 candidates, top-64, keeping the best) are sent unchanged
to the third guard, with random-character suffixes of the same length as the control, and judged there
(refusal, target, secret).
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
from companion.chat_data import ChatRecipe, guarded_chat_data
from companion.generation import attack_success, chat_prompt_ids, generate_batch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gcg_noise_guard import GCG_CONFIG, INIT, _cpu, heldout_attacks  # noqa: E402  (the chapter's settings)

RECORD = HERE / "recorded" / "gcg_exercises.json"
N_WIDTH, N_TRANSFER = 4, 5
WIDTH_BUDGET = 1 + 30 * (128 + 3)
WIDTH_SETTINGS = [(32, 64), (128, 64), (256, 64), (128, 8)]  # (search_width, topk)
ENSEMBLE_STEPS = 40
THIRD = "guarded-chat-seed2"
if THIRD not in zoo.available():
    zoo.register(THIRD, ChatRecipe(seed=2))


def judges(model, tok, names, suffixes, requests, targets, secrets):
    replies = generate_batch(model, tok, [chat_prompt_ids(tok, requests[n] + s) for n, s in zip(names, suffixes)])
    return {"refusal": attack_success(replies, "refusal"),
            "target": attack_success(replies, "target", [targets[n] for n in names]),
            "secret": attack_success(replies, "secret", [secrets[n] for n in names]), "replies": replies}


def ensemble_gcg(models, tok, request, target, steps, seed=0):
    """One suffix for several models (Zou et al. 2023's transfer setting, on one request)."""
    config = gcg.GCGConfig(search_width=128, topk=64, optim_str_init=INIT, seed=seed)
    suffix = torch.tensor(gcg.init_suffix_ids(tok, INIT))
    allowed = gcg.allowed_token_mask(tok, models[0].get_input_embeddings().weight.shape[0])
    before = gcg.build_prompt(tok, request, target).before
    generator = torch.Generator().manual_seed(seed)
    best_loss = float(torch.stack([gcg.candidate_losses(m, tok, request, target, suffix[None], config)
                                   for m in models]).mean())
    best, losses = suffix, []
    for _ in range(steps):
        grad = sum(g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                   for g in (gcg.token_gradients(m, tok, request, target, suffix, config) for m in models))
        cands = gcg.sample_candidates(suffix, grad, 128, 64, 1, allowed, generator)
        cands = cands[gcg.retokenization_filter(tok, cands, before)]
        mean = torch.stack([gcg.candidate_losses(m, tok, request, target, cands, config) for m in models]).mean(0)
        i = int(mean.argmin())
        suffix = cands[i]
        losses.append(float(mean[i]))
        if losses[-1] < best_loss:
            best_loss, best = losses[-1], suffix
    return tok.decode(best), best_loss, losses


def main() -> None:
    print(companion.setup(seed=0))
    chats = guarded_chat_data()
    holders, requests, targets = heldout_attacks(chats)
    first = zoo.load("guarded-chat")
    model, tok = first.model, first.tokenizer
    record = {"gcg_config": dataclasses.asdict(GCG_CONFIG), "machine": {"cpu": _cpu(), "threads": torch.get_num_threads(),
                                                                 "torch": torch.__version__},
              "width": {"budget": WIDTH_BUDGET, "holders": holders[:N_WIDTH], "runs": []}}
    started = time.perf_counter()
    for width, topk in WIDTH_SETTINGS:
        steps = (WIDTH_BUDGET - 1) // (width + 3)
        config = gcg.GCGConfig(num_steps=steps, search_width=width, topk=topk, optim_str_init=INIT, seed=0)
        for n in holders[:N_WIDTH]:
            t0 = time.perf_counter()
            r = gcg.gcg(model, tok, requests[n], targets[n], config)
            run = {"search_width": width, "topk": topk, "num_steps": steps, "holder": n,
                   "success_step": r.success_step, "steps": len(r.losses), "best_loss": r.best_loss,
                   "budget_spent": r.budget[-1],
                   "budget_at_success": None if r.success_step is None else r.budget[r.success_step],
                   "seconds": round(time.perf_counter() - t0, 2)}
            record["width"]["runs"].append(run)
            print(run, flush=True)
    t_width = time.perf_counter()
    third = zoo.load(THIRD)
    model_b, model_c = zoo.load("guarded-chat-seed1").model, third.model
    names = holders[:N_TRANSFER]
    single, ensemble = {}, {}
    for n in names:
        single[n] = gcg.gcg(model, tok, requests[n], targets[n], GCG_CONFIG).best_string
        s, loss, losses = ensemble_gcg([model, model_b], tok, requests[n], targets[n], ENSEMBLE_STEPS)
        ensemble[n] = {"suffix": s, "best_loss": loss, "losses": losses}
        print(n, repr(single[n]), repr(s), round(loss, 3), flush=True)
    control = [gcg.random_suffix(tok, len(single[n]), "chars", seed=i) for i, n in enumerate(names)]
    suffixes = {"single (guarded-chat)": [single[n] for n in names],
                "ensemble (guarded-chat + seed1)": [ensemble[n]["suffix"] for n in names],
                "random characters": control, "no suffix": ["" for _ in names]}
    record["transfer"] = {
        "third_model": THIRD, "third_entry": zoo.entry_folder(THIRD).name, "third_recipe": third.card["recipe"],
        "third_train_seconds": third.card.get("train_seconds"), "holders": names, "ensemble_steps": ENSEMBLE_STEPS,
        "ensemble_best_loss": {n: ensemble[n]["best_loss"] for n in names},
        "suffixes": suffixes,
        "judged": {where: {label: judges(m, tok, names, s, requests, targets, chats.secrets)
                           for label, s in suffixes.items()}
                   for where, m in (("guarded-chat", model), ("guarded-chat-seed1", model_b), (THIRD, model_c))}}
    record["seconds"] = {"width": round(t_width - started, 1), "transfer": round(time.perf_counter() - t_width, 1)}
    record["date"] = time.strftime("%Y-%m-%d")
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RECORD} ({record['seconds']})")


if __name__ == "__main__":
    main()
