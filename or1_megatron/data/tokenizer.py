"""Build a small byte-level BPE tokenizer with DeepSeek-R1-Distill's special tokens, offline.

Owns tokenizer construction for tests and the CPU demo: trained with `tokenizers` on local text,
saved as a transformers tokenizer directory (`AutoTokenizer.from_pretrained(dir)` works offline)
with the R1-Distill chat template. It never downloads anything.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from or1_megatron.data.chat_template import (
    ASSISTANT, BOS, CHAT_TEMPLATE, EOS, PAD, THINK_CLOSE, THINK_OPEN, USER,
)

SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]
# Not "special": decoding with skip_special_tokens must keep them, the rewards look for </think>.
THINK_TOKENS = [THINK_OPEN, THINK_CLOSE]


def arithmetic_corpus(lines: int = 2000, seed: int = 0) -> Iterator[str]:
    """Worked arithmetic in the response format (`... </think> ... \\boxed{n}`), for training text."""
    rng = random.Random(seed)
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        yield (f"What is {a} {op} {b}? {THINK_OPEN}\nWe compute {a} {op} {b} = {value}.\n"
               f"{THINK_CLOSE} The answer is \\boxed{{{value}}}.")


def build_tokenizer(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 4096,
                    model_max_length: int = 32768) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it with the R1-Distill template to `out_dir`."""
    tokenizer = Tokenizer(models.BPE())
    # Digits one token each, as Qwen2's tokenizer splits them: arithmetic stays learnable.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, model_max_length=model_max_length)
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
