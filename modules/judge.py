"""The LLM judge: the original project's prompt asking for a 0-100 score of a model's answer, sent as
the original sent it (temperature 0, seed 123) to any OpenAI-compatible server, the score read from a
loose reply, and a failed request told in one line. gpt_eval.py is its command line."""
import os
import re

import openai

from .datasets.instructions import format_input
from .errors import UserError

THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)  # reasoning models (DeepSeek-R1, Qwen3) think aloud first
FRACTION = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.-])-?\d+(?:\.\d+)?")
# The original's request: the judge's most likely reply, and the seed that asks OpenAI to repeat it.
REQUEST_OPTIONS = {"temperature": 0.0, "seed": 123}


def judge_prompt(entry):
    """The original's prompt, byte for byte (its gpt_eval.py), with this project's key model_response."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the number only."
    )


def parse_score(reply):
    """The 0-100 score in a judge's reply ("85", "Score: 85", "85/100", "8.5 out of 10"), or None."""
    text = THINKING.sub("", reply or "")
    if fraction := FRACTION.search(text):
        value, scale = float(fraction[1]), float(fraction[2])
        value = value / scale * 100 if scale else None
    else:
        number = NUMBER.search(text)
        value = float(number[0]) if number else None
    if value is None or not 0 <= value <= 100:
        return None
    return round(value)


def make_client(base_url=None, api_key=None, max_retries=5, timeout=60.0):
    """An openai client for the judge's server: `base_url` (else $OPENAI_BASE_URL, else OpenAI) with
    `api_key` (else $OPENAI_API_KEY; optional for a server of one's own). It retries a request up to
    `max_retries` times after a 429, 5xx, timeout or dropped connection, and waits `timeout` seconds
    for each reply."""
    base_url = base_url or os.environ.get("OPENAI_BASE_URL")
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        if not base_url:
            raise UserError("OPENAI_API_KEY is not set: `export OPENAI_API_KEY=sk-...` to judge with OpenAI, or use a local "
                            "OpenAI-compatible server, e.g. --base-url http://localhost:11434/v1 --judge-model llama3.1")
        api_key = "no-key"  # local servers ignore it, but the client insists on one
    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout)


def ask_judge(client, judge_model, entry):
    """The judge's reply to the prompt for `entry`. The client retries 429, 5xx, timeouts and dropped
    connections itself, with exponential backoff, following Retry-After when the server sends one."""
    completion = client.chat.completions.create(
        model=judge_model, messages=[{"role": "user", "content": judge_prompt(entry)}], **REQUEST_OPTIONS)
    return completion.choices[0].message.content or ""


def judge_error(error, client, judge_model, scores_path):
    """One clear UserError for a request to `client` that failed for good (None for an openai error of
    another kind); where a rerun helps, it says the scores so far are kept in `scores_path`."""
    url, retries = str(client.base_url), client.max_retries
    saved = f"Scores so far are in {scores_path}; rerun to continue."
    if isinstance(error, openai.AuthenticationError):
        return UserError(f"the judge at {url} rejected the API key (401: {error.message}); "
                         "set OPENAI_API_KEY to a valid key, or point --base-url at a server that needs none")
    if isinstance(error, openai.PermissionDeniedError):
        return UserError(f"the judge at {url} refused access (403: {error.message}); check the key's permissions for {judge_model}")
    if isinstance(error, openai.NotFoundError):
        return UserError(f"{url} has no model {judge_model!r} (404: {error.message}); check --judge-model "
                         "(Ollama: `ollama pull MODEL`) and --base-url (it usually ends in /v1)")
    if isinstance(error, openai.RateLimitError):
        return UserError(f"still rate limited (429) after {retries} retries: {error.message}. "
                         f"Lower --workers or wait. {saved}")
    if isinstance(error, openai.APIStatusError):
        return UserError(f"the judge at {url} answered HTTP {error.status_code}: {error.message}. {saved}")
    if isinstance(error, openai.APITimeoutError):
        return UserError(f"the judge at {url} did not answer within --timeout {client.timeout:g} s, "
                         f"{retries + 1} times. {saved}")
    if isinstance(error, openai.APIConnectionError):
        return UserError(f"could not reach the judge at {url} ({error.__cause__ or error}); is the server running? {saved}")
    return None
