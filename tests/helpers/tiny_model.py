"""A tiny random Llama and a learnable synthetic SFT set, built in a test in well under 3 seconds.

Public API (kept small on purpose; service tests use it too):

- :func:`build_tiny_llama` -> a Hugging Face model folder (safetensors + tokenizer files).
- :func:`tiny_sft_jsonl` -> an SFT JSONL file whose completions are a deterministic function of the prompt.
- :func:`tiny_preference_jsonl` -> preference pairs: chosen names the thing's true colour, rejected a wrong one.

Needs torch, transformers and tokenizers (the ``train`` extra). No network, no hub.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

__all__ = [
    "CHAT_TEMPLATE",
    "build_tiny_llama",
    "shared_tiny_llama",
    "tiny_preference_jsonl",
    "tiny_sft_jsonl",
]

# A minimal chat template in the usual shape: every turn is "<s>role\ncontent</s>\n", and the generation
# prompt opens an assistant turn. "</s>" is the EOS token, so a trained model learns to end its answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)

# Facts for the synthetic task: "What colour is the X?" -> "The X is Y." Learnable by a 2-layer model.
_FACTS: dict[str, str] = {
    "apple": "red",
    "banana": "yellow",
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "orange": "orange",
    "plum": "purple",
    "lemon": "yellow",
    "cherry": "red",
    "leaf": "green",
    "sea": "blue",
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "What colour is the apple? The apple is red. What colour is the sky? The sky is blue.",
    "Please answer the question in one short sentence. Thank you for your help.",
    "You are a helpful assistant. The user asks a question and the assistant answers it.",
    "Numbers: one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9.",
    'Punctuation, quotes "like this", (brackets) and: colons; semicolons! questions? done.',
    "system user assistant tool hello hi yes no maybe good bad big small long short first last",
] + [f"What colour is the {thing}? The {thing} is {colour}." for thing, colour in _FACTS.items()]

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def _train_tokenizer(vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # Byte-level BPE: any UTF-8 text tokenises (no unknown tokens), so tests may use arbitrary strings.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],  # ids 0, 1, 2: the pad token is distinct from EOS
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Like Llama's tokenizer, plain encoding prepends BOS; chat-template text already carries it and is
    # encoded with add_special_tokens=False.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return tokenizer


def shared_tiny_llama(basetemp: Path, relative: str, *, seed: int = 0) -> Path:
    """:func:`build_tiny_llama` once per test run at ``<root>/<relative>``, read-only from then on.

    Under pytest-xdist every worker has its own ``basetemp`` below one folder of the run; the model is built
    there once, under a file lock, instead of once per worker (4.5 s each). ``basetemp`` is
    ``tmp_path_factory.getbasetemp()``.
    """
    from filelock import FileLock

    root = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    dest = root / "shared" / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / (dest.name + ".lock"))):
        done = dest.parent / (dest.name + ".built")  # beside the folder: uploads send every file in it
        if not done.exists():
            build_tiny_llama(dest, seed=seed)
            done.touch()
    return dest


def build_tiny_llama(dest: Path, *, seed: int = 0, chat_template: bool = True) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` (safetensors) and its tokenizer into ``dest``; return it.

    hidden 64, 2 layers, 4 heads (2 KV heads), untied head; vocabulary ~400 byte-level BPE tokens with
    ``<pad>`` (0), ``<s>`` (1, BOS) and ``</s>`` (2, EOS). With ``chat_template=False`` the tokenizer has no
    chat template, which exercises the plain ``prompt + completion + eos`` path. Same seed, same weights.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size=400),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
    )
    if chat_template:
        hf_tokenizer.chat_template = CHAT_TEMPLATE
    hf_tokenizer.save_pretrained(dest)

    config = LlamaConfig(
        vocab_size=len(hf_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=hf_tokenizer.pad_token_id,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # With the default 0.02 the frozen random head and the final RMSNorm cap every logit near +-1.3, so no
        # adapter can get the loss much below ln(vocab) - 2.5; at 0.25 LoRA can fit the synthetic task.
        initializer_range=0.25,
    )
    # Seeded, without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(dest, safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(dest)
    return dest


def tiny_sft_jsonl(path: Path, n: int = 64, *, seed: int = 0, messages: bool = False) -> Path:
    """Write ``n`` SFT records to ``path`` (JSONL) and return it.

    Each completion is a deterministic function of its prompt ("What colour is the sky?" -> "The sky is
    blue."), so the loss on completion tokens can fall well below its starting value within a few dozen steps.
    With ``messages=True`` records use the chat form ``{"messages": [user, assistant]}`` instead of
    ``{"prompt", "completion"}``; every third one then starts with a system message.
    """
    rng = random.Random(seed)
    things = sorted(_FACTS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            thing = rng.choice(things)
            prompt = f"What colour is the {thing}?"
            completion = f"The {thing} is {_FACTS[thing]}."
            record: dict[str, object]
            if messages:
                turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
                if i % 3 == 0:
                    turns.insert(0, {"role": "system", "content": "Answer in one short sentence."})
                record = {"messages": turns}
            else:
                record = {"prompt": prompt, "completion": completion}
            handle.write(json.dumps(record) + "\n")
    return path


def tiny_preference_jsonl(
    path: Path, n: int = 64, *, seed: int = 0, offset: int = 0, messages: bool = False
) -> Path:
    """Write ``n`` preference records and return the path.

    "What colour is the X?" -> chosen "The X is <its colour>.", rejected "The X is <another colour>.": the
    rule (the fact table) is learnable, and the two sides differ in one word, so only that word can explain
    the preference. Records are the distinct (thing, wrong colour) pairs, 84 in all, in a seeded order;
    this file holds positions ``offset .. offset + n`` of it, so two files with the same seed and disjoint
    ranges share no pair (a truly held-out set). With ``messages=True`` every other record uses the messages
    forms (prompt as a user turn, responses as assistant-message lists).
    """
    colours = sorted(set(_FACTS.values()))
    combos = [(thing, wrong) for thing in sorted(_FACTS) for wrong in colours if wrong != _FACTS[thing]]
    random.Random(seed).shuffle(combos)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(offset, offset + n):
            thing, wrong = combos[i % len(combos)]
            prompt: object = f"What colour is the {thing}?"
            chosen: object = f"The {thing} is {_FACTS[thing]}."
            rejected: object = f"The {thing} is {wrong}."
            if messages and i % 2:
                prompt = [{"role": "user", "content": prompt}]
                chosen = [{"role": "assistant", "content": chosen}]
                rejected = [{"role": "assistant", "content": rejected}]
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path
