"""The original's Alpaca prompt, shared by fine-tuning, evaluation and the app."""

PROMPT_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
RESPONSE_MARKER = "\n\n### Response:\n"


def format_input(entry):
    """The prompt for an {"instruction", "input"} record, up to (not including) the response marker.
    The ### Input section appears only when the record has an input."""
    prompt = f"{PROMPT_HEADER}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        prompt += f"\n\n### Input:\n{entry['input']}"
    return prompt


def format_prompt(entry):
    """What the model sees before it answers: the formatted input and the response marker."""
    return format_input(entry) + RESPONSE_MARKER


def format_example(entry):
    """A full training example: prompt followed by the expected output."""
    return format_prompt(entry) + entry["output"]


def extract_response(generated_text):
    """The answer part of a generated text (everything after the response marker), stripped."""
    return generated_text.split("### Response:", 1)[-1].strip()
