import contextlib
import copy

import pytest
import torch

from modules import GPTModel, GPT_CONFIGS, generation
from modules.generation import generate, stream_text, stream_tokens
from modules.inference import KVCache, StaticKVCache, cache_slots, decode_step, next_token_logits
from modules.speed import compiled_decoding, prepare_for_generation
from modules.speed import compiled_generation
from modules.speed.compiled_generation import DecodingProducts
from modules.tokenizer import END_OF_TEXT_ID, encode, get_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel({**GPT_CONFIGS["tiny"], "context_size": 32, "num_layers": 2}).eval()


def test_greedy_with_cache_equals_without(model):
    prompt = torch.randint(0, 50257, (2, 7))
    with_cache = generate(model, prompt, 20)
    assert torch.equal(with_cache, generate(model, prompt, 20, use_cache=False))
    assert with_cache.shape == (2, 27) and torch.equal(with_cache[:, :7], prompt)


def test_generation_past_the_context_equals_recomputing_every_window(model):
    prompt = torch.randint(0, 50257, (1, 20))
    assert torch.equal(generate(model, prompt, 30), generate(model, prompt, 30, use_cache=False))


def test_prompt_longer_than_context_is_cropped_not_a_crash(model):
    prompt = torch.randint(0, 50257, (1, 100))
    output = generate(model, prompt, 5)
    assert output.shape == (1, 105)
    assert torch.equal(output[:, 100:], generate(model, prompt[:, -32:], 5)[:, 32:])


def test_sampling_is_reproducible_with_a_generator(model):
    prompt = torch.randint(0, 50257, (1, 5))

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 15, temperature=1.0, top_k=50, top_p=0.9, generator=generator)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_top_k_one_is_greedy(model):
    prompt = torch.randint(0, 50257, (1, 5))
    assert torch.equal(generate(model, prompt, 10, temperature=0.7, top_k=1), generate(model, prompt, 10))


def test_eos_stops_generation(model):
    prompt = torch.randint(0, 50257, (1, 5))
    first = generate(model, prompt, 1)[0, -1].item()
    output = generate(model, prompt, 10, eos_token_id=first)
    assert output.shape == (1, 6) and output[0, -1].item() == first


def test_left_padded_batch_generates_each_prompt_as_alone(model):
    short, long = torch.randint(0, 50257, (1, 4)), torch.randint(0, 50257, (1, 9))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, long])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[0, :5] = False
    output = generate(model, batch, 12, attention_mask=mask)
    assert torch.equal(output[0, 9:], generate(model, short, 12)[0, 4:])
    assert torch.equal(output[1, 9:], generate(model, long, 12)[0, 9:])


def test_stream_tokens_yields_one_token_per_step(model):
    prompt = torch.randint(0, 50257, (3, 4))
    steps = list(stream_tokens(model, prompt, 6))
    assert len(steps) == 6 and all(step.shape == (3,) for step in steps)
    assert torch.equal(torch.stack(steps, dim=1), generate(model, prompt, 6)[:, 4:])  # generate's tokens, in order


def test_stream_text_yields_whole_characters(model, monkeypatch):
    """日 and 本 are split over several tokens; each comes out whole, in the piece of the token that ends it."""
    tokenizer = get_tokenizer()
    token_ids = encode("Café 🙂 naïve 日本", tokenizer)
    token_bytes = [tokenizer.decode_single_token_bytes(token_id) for token_id in token_ids]
    assert b"\x97" in token_bytes and b"\xac" in token_bytes  # tokens that hold a part of a character
    monkeypatch.setattr(generation, "stream_tokens", lambda *args, **kwargs: (torch.tensor([t]) for t in token_ids))
    assert list(stream_text(model, "Hello", len(token_ids))) == ["C", "af", "é", " 🙂", " naïve", " ", "日", "本"]


def test_stream_text_of_an_empty_prompt_starts_from_end_of_text(model):
    new_ids = generate(model, torch.tensor([[END_OF_TEXT_ID]]), 5)[0, 1:].tolist()
    new_bytes = b"".join(get_tokenizer().decode_single_token_bytes(token_id) for token_id in new_ids)
    assert "".join(stream_text(model, "", 5, stop_at_end_of_text=False)) == new_bytes.decode("utf-8", errors="replace")


def padded_batch():
    """Two prompts of 4 and 9 tokens, the shorter padded on the left, and their attention mask."""
    short, long = torch.randint(0, 50257, (1, 4)), torch.randint(0, 50257, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[0, :5] = False
    return batch, mask


def assert_static_cache_follows_the_growing_one(model, tokens, mask=None, step=decode_step, tolerance=None):
    """12 greedy steps from `tokens`: the logits with a StaticKVCache, its later tokens through `step`, are
    those with a growing KVCache (within `tolerance`; None: assert_close's default for the dtype)."""
    batch = tokens.shape[0]
    growing_cache = KVCache.for_model(model, batch)
    static_cache = StaticKVCache.for_model(model, batch, tokens.shape[1] + 12)
    with torch.inference_mode():
        for _ in range(12):
            growing = next_token_logits(model, tokens, mask, growing_cache)
            static = next_token_logits(model, tokens, mask, static_cache, step)
            torch.testing.assert_close(static, growing, rtol=tolerance, atol=tolerance)
            tokens = torch.cat([tokens, growing.argmax(-1, keepdim=True)], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)


def test_the_static_cache_gives_the_growing_caches_logits(model):
    assert_static_cache_follows_the_growing_one(model, *padded_batch())


def test_the_static_cache_length_comes_in_buckets():
    assert [cache_slots(tokens, 1024) for tokens in (1, 128, 129, 320, 400, 1024, 5000)] == [128, 128, 256, 384, 512, 1024, 1024]
    assert cache_slots(100, 32) == 32  # never more than the context


@pytest.mark.slow
def test_compiled_greedy_equals_eager(model):
    # One shape (batch 2, the context's 32 slots), compiled once for the whole test: about 30 s on 2 cores.
    batch, mask = padded_batch()
    compiled = generate(model, batch, 30, attention_mask=mask, compiled=True)  # past the context too
    assert torch.equal(compiled, generate(model, batch, 30, attention_mask=mask))
    assert compiled_decoding(model).is_ready(2, 32)
    assert not compiled_decoding(model).failed


def test_the_decoding_steps_products_are_the_linear_layers():
    # A single row written out as a sum, float32 rows as W x^T, bfloat16 rows as F.linear computes them.
    linear = torch.nn.Linear(16, 8)
    row, rows = torch.randn(1, 1, 16), torch.randn(2, 3, 16)
    bfloat16_linear, bfloat16_rows = copy.deepcopy(linear).bfloat16(), rows.bfloat16()
    # The expected products are computed outside the mode: inside it, F.linear is the mode's too.
    expected = [torch.nn.functional.linear(x, linear.weight, linear.bias) for x in (row, rows)]
    expected_bfloat16 = bfloat16_linear(bfloat16_rows)
    with DecodingProducts():
        for x, y in zip((row, rows), expected):
            torch.testing.assert_close(linear(x), y)
            assert linear(x).shape == y.shape
        assert torch.equal(bfloat16_linear(bfloat16_rows), expected_bfloat16)


@pytest.mark.slow
def test_compiled_batch_of_one_follows_the_eager_logits_in_float32_and_int8(model):
    # Batch 1 is where the compiled step writes each product out (DecodingProducts): float32 and an
    # int8 copy of the same model compile graphs of their own in one process (the module types differ).
    # int8 computes in bfloat16 where the CPU has it: bfloat16's tolerance. float32 runs again last: its
    # built step skips every guard but those that tell it from int8's (CompiledDecoding.step).
    prompt = torch.randint(0, 50257, (1, 9))
    int8 = prepare_for_generation(copy.deepcopy(model), "int8")
    for prepared in (model, int8, model):
        tolerance = 1e-4 if prepared.token_embedding.weight.dtype == torch.float32 else 3e-2
        assert_static_cache_follows_the_growing_one(prepared, prompt, step=compiled_decoding(prepared).step,
                                                    tolerance=tolerance)
        assert compiled_decoding(prepared).is_ready(1, 21) and not compiled_decoding(prepared).failed


@pytest.mark.slow
def test_a_shorter_generation_takes_the_compiled_step_of_a_longer_one():
    # The app compiles for a 64-token prompt in the background; a 5-token prompt must not compile again.
    model = GPTModel({**GPT_CONFIGS["tiny"], "context_size": 1024, "num_layers": 1})
    decoding = compiled_decoding(model)
    decoding.ready.add((1, 256))  # as if built: nothing is compiled here
    assert decoding.is_ready(1, 105) and decoding.cache_for(1, 105).filled.shape == (1, 256)
    assert not decoding.is_ready(1, 300) and decoding.cache_for(1, 300).filled.shape == (1, 384)
    assert not decoding.is_ready(2, 105) and decoding.cache_for(2, 105).filled.shape == (2, 128)


def test_a_step_checks_every_guard_while_a_build_is_under_way(monkeypatch):
    # Skipping guards is the whole process's stance: the first call of a build in the app's background
    # thread must not meet it, or it could run the program of another shape. Nothing is compiled here.
    model = GPTModel({**GPT_CONFIGS["tiny"], "num_layers": 1})
    decoding = compiled_decoding(model)
    cache = decoding.cache_for(1, 8)
    decoding.ready.add(tuple(cache.filled.shape))  # as if built
    stances = []
    monkeypatch.setattr(torch.compiler, "set_stance",
                        lambda *args, **kwargs: stances.append(kwargs) or contextlib.nullcontext())
    decoding.compiled = lambda *args: "compiled"
    token, slot = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    assert decoding.step(model, cache, token, slot) == "compiled"
    assert stances == [{"skip_guard_eval_unsafe": True}]
    with compiled_generation._compiling:  # as a build in another thread holds it
        assert decoding.step(model, cache, token, slot) == "compiled"
    assert len(stances) == 1
