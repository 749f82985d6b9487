"""An LLM judges the instruction-tuned model: each answer in evaluate_responses.py's JSON gets a score
from 0 to 100 against the correct output, with the original's prompt; prints `Average score: X` last.

    export OPENAI_API_KEY=sk-...
    python gpt_eval.py                                         # evaluation/responses.json, judged by gpt-4o-mini
    python gpt_eval.py --base-url http://localhost:11434/v1 --judge-model llama3.1        # Ollama
    python gpt_eval.py --base-url http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct --workers 16  # vLLM
    python gpt_eval.py --base-url http://localhost:8080/v1 --judge-model any              # llama.cpp server

Any OpenAI-compatible server works; with --base-url the API key is optional. Scores are written to
--out as they arrive, and a rerun asks only about the answers not scored yet (an unparsable reply is
recorded with score null, counted, and asked again on the next run). Rate limits (429), server errors
(5xx), timeouts and dropped connections are retried with exponential backoff, honouring Retry-After.
"""
import argparse
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import openai
from tqdm import tqdm

from modules.errors import UserError, run_main
from modules.files import atomic_write_text, exclusive_output
from modules.datasets.instructions import format_input

THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)  # reasoning models (DeepSeek-R1, Qwen3) think aloud first
FRACTION = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.-])-?\d+(?:\.\d+)?")


def judge_prompt(entry):
    """The original's prompt, word for word."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
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


def load_responses(path):
    """evaluate_responses.py's JSON list; the original's key "model response" is read too."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; make it with `python evaluate_responses.py` (or pass --data PATH)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not a UTF-8 JSON file ({error})") from None
    if not isinstance(records, list):
        raise UserError(f"{path} holds a JSON {type(records).__name__}, not the list of answers evaluate_responses.py writes")
    entries = []
    for index, record in enumerate(records):
        response = record.get("model_response", record.get("model response")) if isinstance(record, dict) else None
        if response is None or "instruction" not in record or "output" not in record:
            raise UserError(f"entry {index} of {path} (counting from 0) needs 'instruction', 'output' and 'model_response'")
        entries.append({"instruction": record["instruction"], "input": record.get("input", ""),
                        "output": record["output"], "model_response": response})
    return entries


def earlier_scores(out, judge_model):
    """Scores already in `out` from this judge, by the answer they judge."""
    if not out.is_file():
        return {}
    try:
        scores = json.loads(out.read_text(encoding="utf-8"))["scores"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{out} exists but is not a scores file of gpt_eval.py; move it away or choose another --out") from None
    return {score_key(record): record for record in scores
            if record.get("judge_model") == judge_model and record.get("score") is not None}


def score_key(record):
    return tuple(record.get(key) for key in ("instruction", "input", "output", "model_response"))


def make_client(args):
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        if not base_url:
            raise UserError("OPENAI_API_KEY is not set: `export OPENAI_API_KEY=sk-...` to judge with OpenAI, or use a local "
                            "OpenAI-compatible server, e.g. --base-url http://localhost:11434/v1 --judge-model llama3.1")
        api_key = "no-key"  # local servers ignore it, but the client insists on one
    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=args.max_retries, timeout=args.timeout)


def ask_judge(client, judge_model, entry):
    """The judge's reply to the prompt for `entry`. The client retries 429, 5xx, timeouts and dropped
    connections itself, with exponential backoff, following Retry-After when the server sends one."""
    completion = client.chat.completions.create(
        model=judge_model, temperature=0.0, messages=[{"role": "user", "content": judge_prompt(entry)}])
    return completion.choices[0].message.content or ""


def judge_error(error, args, url):
    """One clear message for a request that failed for good."""
    saved = f"Scores so far are in {args.out}; rerun to continue."
    if isinstance(error, openai.AuthenticationError):
        return UserError(f"the judge at {url} rejected the API key (401: {error.message}); "
                         "set OPENAI_API_KEY to a valid key, or point --base-url at a server that needs none")
    if isinstance(error, openai.PermissionDeniedError):
        return UserError(f"the judge at {url} refused access (403: {error.message}); check the key's permissions for {args.judge_model}")
    if isinstance(error, openai.NotFoundError):
        return UserError(f"{url} has no model {args.judge_model!r} (404: {error.message}); check --judge-model "
                         "(Ollama: `ollama pull MODEL`) and --base-url (it usually ends in /v1)")
    if isinstance(error, openai.RateLimitError):
        return UserError(f"still rate limited (429) after {args.max_retries} retries: {error.message}. "
                         f"Lower --workers or wait. {saved}")
    if isinstance(error, openai.APIStatusError):
        return UserError(f"the judge at {url} answered HTTP {error.status_code}: {error.message}. {saved}")
    if isinstance(error, openai.APITimeoutError):
        return UserError(f"the judge at {url} did not answer within --timeout {args.timeout:g} s, "
                         f"{args.max_retries + 1} times. {saved}")
    if isinstance(error, openai.APIConnectionError):
        return UserError(f"could not reach the judge at {url} ({error.__cause__ or error}); is the server running? {saved}")
    return None


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("evaluation/responses.json"),
                        help="the answers to judge, as evaluate_responses.py writes them (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("evaluation/scores.json"), help="scores file (default: %(default)s)")
    parser.add_argument("--num", type=int, default=None, help="judge the first N answers only (default: all)")
    parser.add_argument("--judge-model", default="gpt-4o-mini", help="the judging model (default: %(default)s)")
    parser.add_argument("--base-url", default=None,
                        help="an OpenAI-compatible server, e.g. http://localhost:11434/v1 (default: OpenAI)")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once (default: %(default)s)")
    parser.add_argument("--max-retries", type=int, default=5,
                        help="retries of a request after a 429, 5xx, timeout or dropped connection (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one reply (default: %(default)s)")
    parser.add_argument("--device", default=None, help="accepted like every script's; the judge runs on its server")
    args = parser.parse_args()
    if args.workers < 1 or args.max_retries < 0 or args.timeout <= 0:
        parser.error("--workers must be at least 1, --max-retries at least 0 and --timeout positive")
    return args


def write_scores(args, results):
    """The scores so far and their summary, written whole or not at all; returns the summary."""
    report = summary(args, [result for result in results if result])
    atomic_write_text(args.out, json.dumps(report, indent=2, ensure_ascii=False))
    return report


def summary(args, results):
    scores = [result["score"] for result in results if result["score"] is not None]
    return {"judge_model": args.judge_model, "responses": str(args.data),
            "average_score": sum(scores) / len(scores) if scores else None,
            "scored": len(scores), "unparsable": len(results) - len(scores), "scores": results}


def ask_about(pending, entries, results, client, args, url):
    """Ask the judge about entries[i] for every i in `pending`, `--workers` at a time, and fill in
    results[i] as the replies arrive, saving after each."""
    executor = ThreadPoolExecutor(max_workers=args.workers)
    futures = {executor.submit(ask_judge, client, args.judge_model, entries[index]): index for index in pending}
    try:
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"judging with {args.judge_model}", unit="answer"):
            index = futures[future]
            try:
                reply = future.result()
            except openai.OpenAIError as error:
                raise judge_error(error, args, url) or error
            score = parse_score(reply)
            results[index] = {"index": index, **entries[index], "score": score, "judge_reply": reply,
                              "judge_model": args.judge_model}
            tqdm.write(f"[{index}] score: {score}" if score is not None else f"[{index}] unparsable reply: {reply!r}")
            write_scores(args, results)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)  # after a fatal error, ask nothing more


def main():
    args = parse_args()
    entries = load_responses(args.data)[:args.num]
    client = make_client(args)
    with exclusive_output(args.out):
        earlier = earlier_scores(args.out, args.judge_model)
        results = [{**earlier[score_key(entry)], "index": index} if score_key(entry) in earlier else None
                   for index, entry in enumerate(entries)]
        pending = [index for index, result in enumerate(results) if result is None]
        if len(pending) < len(entries):
            print(f"{len(entries) - len(pending)} answers already scored in {args.out}; asking about the other {len(pending)}")
        ask_about(pending, entries, results, client, args, str(client.base_url))
        report = write_scores(args, results)
    print(f"{report['scored']} of {len(entries)} answers scored by {args.judge_model}, {report['unparsable']} unparsable "
          f"(score null in {args.out}; a rerun asks again)")
    average = f"{report['average_score']:.2f}" if report["scored"] else "n/a (no reply held a score)"
    print(f"Average score: {average}")


if __name__ == "__main__":
    run_main(main)
