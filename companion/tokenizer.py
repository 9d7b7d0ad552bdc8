"""The course tokenizer: byte-level BPE trained offline, wrapped as a ``PreTrainedTokenizerFast``.

Byte-level BPE (as in GPT-2; Sennrich et al. 2016, Radford et al. 2019) never meets an unknown
character: every string falls back to bytes. We train it with Hugging Face ``tokenizers`` on the text
the models will see and wrap it so every ``transformers`` API works on it: ``__call__``, padding,
``decode``, ``apply_chat_template``, ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
#: Chat roles. Each is one special token, so a user cannot forge a role by typing its name.
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, *ROLE_TOKENS.values(), END_OF_TURN]

#: Jinja chat template: ``<|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 2048, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts`` and return it as a ``PreTrainedTokenizerFast``.

    Plain calls prepend ``<|bos|>`` (the LM always sees a start token); ``apply_chat_template`` writes
    its own. Deterministic: the same texts give the same vocabulary and merges.
    """
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a non-empty list of str")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), "
                         f"got {vocab_size}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return wrap(tok)


def wrap(tokenizer_object):
    """Wrap a ``tokenizers.Tokenizer`` with the course's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
    )
    fast.add_special_tokens({"additional_special_tokens": [*ROLE_TOKENS.values(), END_OF_TURN]})
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved with ``save_pretrained`` (offline; a clear error if the folder is missing)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))
