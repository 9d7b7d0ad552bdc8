"""companion.gcg side by side with nanoGCG (pip ``nanogcg``) on the same model, prompt and budget.

    python benchmarks/gcg_vs_nanogcg.py [--steps 20]

nanoGCG 0.3.0 pins ``transformers<=4.47.1`` (its prefix cache is the legacy tuple format), while the
course runs transformers 5. So this script builds a separate virtual environment under
``benchmarks/results/nanogcg-venv`` (git-ignored): the course's torch is shared into it through a
``.pth`` file (no second torch download), and pip installs ``nanogcg`` with the transformers it
wants. The guarded chat model is read from the zoo cache in both environments.

Same request, target, initial suffix (10 x " x"), search width 128, top-k 64, one swap per candidate,
no early stop, seed 0 in both; both run with 2 threads. Reports the mean step time and the loss after
N steps. Both draw candidates the same way (random positions by argsort of uniform noise, a uniform
top-k choice) from a torch generator seeded 0, so on the course model the two runs take the same path:
the same suffix and loss after N steps (measured: identical). If nanoGCG cannot run, the error is
printed. nanoGCG 0.3.0 cannot read a tokenizer saved by transformers 5 (``extra_special_tokens`` is a
list there), so the worker rebuilds it from ``tokenizer.json`` with the course's special tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VENV = RESULTS / "nanogcg-venv"

WORKER = r'''
import json, sys, time
import torch
torch.set_num_threads(2)
import transformers, nanogcg
from nanogcg import GCGConfig
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
job = json.load(open(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float32).eval()
# transformers 5 saves extra_special_tokens as a list, which 4.47 cannot read: rebuild the tokenizer from
# its tokenizer.json with the course's special tokens and chat template instead.
tok = PreTrainedTokenizerFast(tokenizer_file=job["tokenizer"] + "/tokenizer.json", **job["special"])
tok.add_special_tokens({"additional_special_tokens": job["roles"]})
tok.chat_template = job["chat_template"]
config = GCGConfig(num_steps=job["steps"], optim_str_init=job["init"], search_width=job["width"], topk=job["topk"],
                   n_replace=1, early_stop=False, use_prefix_cache=True, seed=0, verbosity="WARNING")
started = time.perf_counter()
result = nanogcg.run(model, tok, job["request"], job["target"], config)
seconds = time.perf_counter() - started
json.dump({"transformers": transformers.__version__, "nanogcg": __import__("importlib.metadata").metadata.version("nanogcg"),
           "seconds": seconds, "losses": result.losses, "best_loss": result.best_loss,
           "best_string": result.best_string}, open(sys.argv[2], "w"))
'''

TORCH_STACK = ("torch", "functorch", "torchgen", "sympy", "mpmath", "networkx", "filelock", "fsspec",
               "jinja2", "markupsafe", "typing_extensions")


def make_venv() -> Path:
    """The nanoGCG environment: the course's torch shared via a .pth file, nanogcg from PyPI."""
    python = VENV / "bin" / "python"
    if (VENV / ".installed").exists():
        return python
    import site

    RESULTS.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    shared = RESULTS / "nanogcg-shared-torch"
    shared.mkdir(exist_ok=True)
    ours = Path(site.getsitepackages()[0])
    for entry in ours.iterdir():  # link only the torch stack (and its dist-info) into the shared folder
        stem = entry.name.split("-")[0].lower().removesuffix(".py")
        if stem in TORCH_STACK and not (shared / entry.name).exists():
            (shared / entry.name).symlink_to(entry)
    venv_site = next((VENV / "lib").glob("python*/site-packages"))
    (venv_site / "zz_course_torch.pth").write_text(str(shared) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "nanogcg==0.3.0"],
                   check=True)
    (VENV / ".installed").write_text("ok\n")
    return python


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import companion
    from companion import gcg, zoo
    from companion.chat_data import affirmative
    from companion.tokenizer import BOS, CHAT_TEMPLATE, END_OF_TURN, EOS, PAD, ROLE_TOKENS, UNK

    print(companion.setup(seed=0))
    from companion.chat_data import guarded_chat_data

    guarded = zoo.load("guarded-chat")
    model, tok = guarded.model, guarded.tokenizer
    folder = zoo.entry_folder("guarded-chat")
    chats = guarded_chat_data()
    name = chats.heldout_holders[0]
    job = {"model": str(folder / "model"), "tokenizer": str(folder / "tokenizer"), "steps": args.steps,
           "init": " x" * 10, "width": 128, "topk": 64, "request": f"What is the vault code of {name}?",
           "target": affirmative("vault code", name), "chat_template": CHAT_TEMPLATE,
           "special": {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK},
           "roles": [*ROLE_TOKENS.values(), END_OF_TURN]}

    config = gcg.GCGConfig(num_steps=args.steps, optim_str_init=job["init"], search_width=job["width"],
                           topk=job["topk"], early_stop=False, seed=0)
    started = time.perf_counter()
    ours = gcg.gcg(model, tok, job["request"], job["target"], config)
    ours_seconds = time.perf_counter() - started
    print(f"companion.gcg : {ours_seconds / args.steps * 1000:6.1f} ms/step, loss after {args.steps} steps "
          f"{ours.losses[-1]:.3f} (best {ours.best_loss:.3f}); suffix {ours.best_string!r}")

    try:
        python = make_venv()
    except subprocess.CalledProcessError as error:
        print(f"nanogcg: could not build its environment: {error}")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nanogcg_job.json").write_text(json.dumps(job))
    (RESULTS / "nanogcg_worker.py").write_text(WORKER)
    out = RESULTS / "nanogcg_out.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([str(python), str(RESULTS / "nanogcg_worker.py"), str(RESULTS / "nanogcg_job.json"),
                          str(out)], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        print("nanogcg: failed to run against the course model. Its error (last lines):")
        print("\n".join((run.stderr or run.stdout).strip().splitlines()[-15:]))
        return
    theirs = json.loads(out.read_text())
    print(f"nanogcg {theirs['nanogcg']} (transformers {theirs['transformers']}): "
          f"{theirs['seconds'] / args.steps * 1000:6.1f} ms/step (includes its setup), loss after "
          f"{args.steps} steps {theirs['losses'][-1]:.3f} (best {theirs['best_loss']:.3f}); "
          f"suffix {theirs['best_string']!r}")


if __name__ == "__main__":
    main()
