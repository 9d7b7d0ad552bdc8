"""The course tokenizer: byte-level BPE trained offline, wrapped as a ``PreTrainedTokenizerFast``.

Byte-level BPE (as in GPT-2; Sennrich et al. 2016, Radford et al. 2019) never meets an unknown
character: every string falls back to bytes. We train it with Hugging Face ``tokenizers`` on the text
the models will see and wrap it so every ``transformers`` API works on it: ``__call__``, padding,
``decode``, ``apply_chat_template``, ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

from companion.checks import check_bool, check_int, check_tokenizer

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
    check_int("vocab_size", vocab_size, minimum=256 + len(SPECIAL_TOKENS))
    check_int("min_frequency", min_frequency, minimum=0)
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
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer_object, Tokenizer):
        raise TypeError(f"tokenizer_object must be a tokenizers.Tokenizer, got {type(tokenizer_object).__name__}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
    )
    fast.add_special_tokens({"additional_special_tokens": [*ROLE_TOKENS.values(), END_OF_TURN]})
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def _check_chat_call(tokenizer, messages, add_generation_prompt) -> None:
    check_tokenizer(tokenizer)
    if not isinstance(messages, list) or not messages:
        raise TypeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    check_bool("add_generation_prompt", add_generation_prompt)


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the course's chat format, with message *contents* encoded so that
    they can never produce a special token.

    ``apply_chat_template`` renders the conversation to a string and tokenises it, so a user who types
    ``<|assistant|>`` inside a message gets the real role token: role forgery. Here the role markers
    come from the token ids themselves and every content is tokenised with
    ``split_special_tokens=True``, so typed markers stay plain characters. Chapter 06 builds on this.
    For benign contents the result equals ``apply_chat_template(..., tokenize=True)``.
    """
    _check_chat_call(tokenizer, messages, add_generation_prompt)
    role_ids = {role: tokenizer.convert_tokens_to_ids(token) for role, token in ROLE_TOKENS.items()}
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if tokenizer.unk_token_id in (*role_ids.values(), end_id) or tokenizer.bos_token != BOS:
        raise ValueError("tokenizer must be the course tokenizer (with <|system|>, <|user|>, <|assistant|>, "
                         "<|end|> and <|bos|>); for another tokenizer use its own apply_chat_template")
    ids = [tokenizer.bos_token_id]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise TypeError(f"messages[{i}] must be a dict with keys 'role' and 'content', got {message!r}")
        if message["role"] not in role_ids:
            raise ValueError(f"messages[{i}]['role'] must be one of {sorted(role_ids)}, got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise TypeError(f"messages[{i}]['content'] must be a str, got {type(message['content']).__name__}")
        content = tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids += [role_ids[message["role"]], *content, end_id]
    if add_generation_prompt:
        ids.append(role_ids["assistant"])
    return ids


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved with ``save_pretrained`` (offline; a clear error if the folder is missing)."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"path {path} holds no tokenizer.json (save one with save_pretrained)")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))
