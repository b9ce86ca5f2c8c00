"""A tokenizer built offline with R1-Distill's special tokens and chat template loads via AutoTokenizer."""
import pytest
from transformers import AutoTokenizer

from or1_megatron.data.chat_template import GENERATION_PREFIX, render_chat
from or1_megatron.data.filters import filter_prompt_length
from or1_megatron.data.loaders import load_problems
from or1_megatron.data.tokenizer import THINK_TOKENS, arithmetic_corpus, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, shared_data):
    records = load_problems(shared_data / "train" / "aime_1983_2023.json")
    texts = [r.question for r in records] + list(arithmetic_corpus(1000))
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out, texts, vocab_size=1024)
    return out


def test_loads_offline_with_the_chat_template(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(messages)
    assert text == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2+2?" + GENERATION_PREFIX
    assert text.endswith("<｜Assistant｜><think>\n")


def test_earlier_assistant_turns_drop_their_thinking(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "<think>\nhmm\n</think>\nfour"},
                {"role": "user", "content": "b"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == render_chat(messages, add_generation_prompt=False)
    assert "hmm" not in text and "<｜Assistant｜>\nfour<｜end▁of▁sentence｜>" in text


def test_special_and_think_tokens_are_single_and_survive_decoding(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for token in ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", *THINK_TOKENS]:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    ids = tok("x </think> The answer is \\boxed{4}.<｜end▁of▁sentence｜>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "x </think> The answer is \\boxed{4}."
    assert tok.eos_token == "<｜end▁of▁sentence｜>" and tok.pad_token_id != tok.eos_token_id


def test_prompt_length_filter(tokenizer_dir, shared_data):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    records = load_problems(shared_data / "eval" / "aime24.parquet")
    lengths = sorted(len(tok(tok.apply_chat_template(r.prompt, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"]) for r in records)
    limit = lengths[len(lengths) // 2]
    result = filter_prompt_length(records, tok, limit)
    assert len(result.kept) == sum(n <= limit for n in lengths)
    assert sum(result.dropped.values()) == len(records) - len(result.kept) > 0
