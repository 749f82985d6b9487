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
The judge runs on its server, so this script, unlike the others, takes no --device. The judge itself
(prompt, request, reading the score) is modules/judge.py.
"""
import argparse
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import openai
from tqdm import tqdm

from modules.errors import UserError, run_main
from modules.files import exclusive_output, read_json
from modules.judge import ask_judge, judge_error, make_client, parse_score
from modules.results import ResumableResults


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
    args = parser.parse_args()
    if args.workers < 1 or args.max_retries < 0 or args.timeout <= 0:
        parser.error("--workers must be at least 1, --max-retries at least 0 and --timeout positive")
    return args


def load_responses(path):
    """evaluate_responses.py's JSON list; the original's key "model response" is read too."""
    records = read_json(path, "the JSON list of answers evaluate_responses.py writes; "
                              "make it with `python evaluate_responses.py` (or pass --data PATH)", expect=list)
    entries = []
    for index, record in enumerate(records):
        response = record.get("model_response", record.get("model response")) if isinstance(record, dict) else None
        if response is None or "instruction" not in record or "output" not in record:
            raise UserError(f"entry {index} of {path} (counting from 0) needs 'instruction', 'output' and 'model_response'")
        entry = {"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"],
                 "model_response": response}
        if wrong := [key for key, value in entry.items() if not isinstance(value, str)]:
            raise UserError(f"entry {index} of {path} (counting from 0): {', '.join(wrong)} must be text, "
                            f"not {type(entry[wrong[0]]).__name__}")
        entries.append(entry)
    return entries


def score_key(record):
    return tuple(record.get(key) for key in ("instruction", "input", "output", "model_response"))


def scores_file(args, results):
    """The scores so far, each numbered by its answer's place in --data, and their summary."""
    # A score kept from an earlier run may have judged an answer that stood elsewhere then.
    scored = [{**result, "index": index} for index, result in enumerate(results) if result]
    scores = [result["score"] for result in scored if result["score"] is not None]
    return {"judge_model": args.judge_model, "responses": str(args.data),
            "average_score": sum(scores) / len(scores) if scores else None,
            "scored": len(scores), "unparsable": len(scored) - len(scores), "scores": scored}


def score_answers(scores, entries, client, args):
    """Ask the judge about entries[i] for every pending i, `--workers` at a time, and record each
    score in `scores` (saved at once) as the replies arrive."""
    executor = ThreadPoolExecutor(max_workers=args.workers)
    futures = {executor.submit(ask_judge, client, args.judge_model, entries[index]): index for index in scores.pending}
    try:
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"judging with {args.judge_model}", unit="answer"):
            index = futures[future]
            try:
                reply = future.result()
            except openai.OpenAIError as error:
                raise judge_error(error, client, args.judge_model, args.out) or error
            score = parse_score(reply)
            scores.record({index: {"index": index, **entries[index], "score": score, "judge_reply": reply,
                                   "judge_model": args.judge_model}})
            tqdm.write(f"[{index}] score: {score}" if score is not None else f"[{index}] unparsable reply: {reply!r}")
    finally:
        executor.shutdown(wait=False, cancel_futures=True)  # after a fatal error, ask nothing more


def main():
    args = parse_args()
    entries = load_responses(args.data)[:args.num]
    client = make_client(args.base_url, max_retries=args.max_retries, timeout=args.timeout)
    with exclusive_output(args.out):
        # An unparsable reply is not kept, so a rerun asks again.
        scores = ResumableResults(
            args.out, entries, key=score_key, what="a scores file of gpt_eval.py", field="scores",
            keeps=lambda record: record.get("judge_model") == args.judge_model and record.get("score") is not None,
            to_file=lambda results: scores_file(args, results))
        if scores.kept:
            print(f"{scores.kept} answers already scored in {args.out}; asking about the other {len(scores.pending)}")
        score_answers(scores, entries, client, args)
        report = scores.save()
    print(f"{report['scored']} of {len(entries)} answers scored by {args.judge_model}, {report['unparsable']} unparsable "
          f"(score null in {args.out}; a rerun asks again)")
    average = f"{report['average_score']:.2f}" if report["scored"] else "n/a (no reply held a score)"
    print(f"Average score: {average}")


if __name__ == "__main__":
    run_main(main)
