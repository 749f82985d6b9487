import copy
import threading

import pytest
import torch

from modules import GPTModel, GPT_CONFIGS, generation
from modules.generation import generate, stream_text, stream_tokens
from modules.errors import UserError
from modules.inference import EagerDecoding
from modules.lora import LORA_TARGETS, LoRALinear
from modules.speed import CompiledDecoder, prepare_for_generation
from modules.speed.compiled_generation import DecodingProducts, cache_slots, program_of
from modules.tokenizer import END_OF_TEXT_ID, encode, get_tokenizer


@pytest.fixture(autouse=True)
def no_compiled_programs_yet():
    """Dynamo keeps at most 8 programs of one function in a process (past them the decoder falls back to
    the eager step): each test starts with none, whatever the tests before it compiled."""
    torch.compiler.reset()


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


def assert_the_fast_path_follows_the_eager_one(model, decoder, tokens, mask=None, tolerance=None):
    """12 greedy steps from `tokens`: the logits of `decoder`'s StaticDecoding are those of the eager path's
    growing cache (within `tolerance`; None: assert_close's default for the dtype)."""
    batch = tokens.shape[0]
    eager, fast = EagerDecoding(model, batch), decoder.start(model, batch, tokens.shape[1] + 12)
    with torch.inference_mode():
        for _ in range(12):
            expected = eager.next_token_logits(tokens, mask)
            torch.testing.assert_close(fast.next_token_logits(tokens, mask), expected, rtol=tolerance, atol=tolerance)
            tokens = torch.cat([tokens, expected.argmax(-1, keepdim=True)], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)


def test_the_static_cache_gives_the_growing_caches_logits(model):
    decoder = CompiledDecoder(model)
    decoder.failed = "as where compiling is impossible"  # the eager step over the static cache: nothing compiles
    assert_the_fast_path_follows_the_eager_one(model, decoder, *padded_batch())
    assert not decoder.ready


def test_the_static_cache_length_comes_in_buckets():
    assert [cache_slots(tokens, 1024) for tokens in (1, 128, 129, 320, 400, 1024, 5000)] == [128, 128, 256, 384, 512, 1024, 1024]
    assert cache_slots(100, 32) == 32  # never more than the context


@pytest.mark.slow
def test_compiled_greedy_equals_eager(model):
    # One shape (batch 2, the context's 32 slots), compiled once for the whole test: about 30 s on 2 cores.
    batch, mask = padded_batch()
    decoder = CompiledDecoder(model)
    compiled = generate(model, batch, 30, attention_mask=mask, decoder=decoder)  # past the context too
    assert torch.equal(compiled, generate(model, batch, 30, attention_mask=mask))
    assert decoder.ready_slots(2, 32) == 32 and not decoder.failed


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


def tolerance_of(model):
    """float32 follows the eager logits closely; bfloat16 (also int8's activations where native) loosely."""
    return 1e-4 if model.token_embedding.weight.dtype == torch.float32 else 3e-2


@pytest.mark.slow
def test_a_compiled_decoder_whose_model_changes_builds_again_and_follows_the_eager_path():
    # Batch 1, where the compiled step writes each product out (DecodingProducts). The same decoder and model
    # object through every change a user makes: LoRA on one block only (the other blocks as they were),
    # another dtype, int8 layers; each gets a program of its own, never another's.
    torch.manual_seed(1)
    model = GPTModel({**GPT_CONFIGS["tiny"], "context_size": 32, "num_layers": 2}).eval()
    decoder, prompt = CompiledDecoder(model), torch.randint(0, 50257, (1, 9))
    programs = []

    def lora_on_the_second_block(model):
        for parent in model.blocks[1].modules():
            for name, child in list(parent.named_children()):
                if name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                    layer = LoRALinear(child, rank=2, alpha=4.0)
                    torch.nn.init.normal_(layer.B, std=0.02)  # a trained LoRA: B is no longer zero
                    parent.register_module(name, layer)

    # LoRA before int8: quantize_int8 turns the LoRA layers' own Linear into int8 too.
    changes = [lambda model: model, lora_on_the_second_block, lambda model: model.to(torch.bfloat16),
               lambda model: prepare_for_generation(model, "int8")]
    for change in changes:
        change(model)
        programs.append(program_of(model))
        assert_the_fast_path_follows_the_eager_one(model, decoder, prompt, tolerance=tolerance_of(model))
        assert decoder.ready_slots(1, 21, programs[-1]) == 32 and not decoder.failed
    assert len(set(programs)) == len(changes)


@pytest.mark.slow
def test_two_models_of_one_shape_each_get_their_own_tokens():
    torch.manual_seed(2)
    config = {**GPT_CONFIGS["tiny"], "context_size": 32, "num_layers": 2}
    first, second = GPTModel(config).eval(), GPTModel(config).eval()
    prompt = torch.randint(0, 50257, (1, 6))
    for model in (first, second, first):
        assert torch.equal(generate(model, prompt, 20, decoder=CompiledDecoder(model)), generate(model, prompt, 20))
    assert not torch.equal(generate(first, prompt, 20), generate(second, prompt, 20))


def test_threads_generating_while_another_thread_compiles_get_the_eager_tokens():
    # The app's sessions: six threads on the built 128-slot step while a seventh compiles the 256-slot one
    # (a longer answer). Every guard is checked at every call, so no thread runs another's program.
    torch.manual_seed(3)
    model = GPTModel({**GPT_CONFIGS["tiny"], "context_size": 256, "num_layers": 1}).eval()
    decoder = CompiledDecoder(model)
    prompts = [torch.randint(0, 50257, (1, 5)) for _ in range(6)]
    generate(model, prompts[0], 20, decoder=decoder)  # builds the 128-slot step
    results = {}

    def answer(name, prompt, new_tokens):
        results[name] = generate(model, prompt, new_tokens, decoder=decoder)

    threads = [threading.Thread(target=answer, args=("long", prompts[0], 200))]
    threads += [threading.Thread(target=answer, args=(index, prompt, 20)) for index, prompt in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, prompt in enumerate(prompts):
        assert torch.equal(results[index], generate(model, prompt, 20)), index
    assert torch.equal(results["long"], generate(model, prompts[0], 200))
    assert decoder.ready_slots(1, 205) == 256 and not decoder.failed


def test_a_decoder_refuses_another_model_in_one_line():
    config = {**GPT_CONFIGS["tiny"], "num_layers": 1}
    decoder = CompiledDecoder(GPTModel(config))
    with pytest.raises(UserError, match="made for another model: make one for each model, CompiledDecoder"):
        generate(GPTModel(config), torch.zeros(1, 2, dtype=torch.long), 3, decoder=decoder)


@pytest.mark.slow
def test_a_shorter_generation_takes_the_compiled_step_of_a_longer_one():
    # The app compiles for a 64-token prompt in the background; a 5-token prompt must not compile again.
    model = GPTModel({**GPT_CONFIGS["tiny"], "context_size": 1024, "num_layers": 1})
    decoder = CompiledDecoder(model)
    decoder.ready.add((program_of(model), 1, 256))  # as if built: nothing is compiled here
    assert decoder.ready_slots(1, 105) == 256 and decoder.start(model, 1, 105).kv_cache.filled.shape == (1, 256)
    assert decoder.ready_slots(1, 300) is None and decoder.start(model, 1, 300).kv_cache.filled.shape == (1, 384)
    assert decoder.ready_slots(2, 105) is None and decoder.start(model, 2, 105).kv_cache.filled.shape == (2, 128)
    model.to(torch.bfloat16)  # another program: the one built is not ready for it
    assert decoder.ready_slots(1, 105) is None
