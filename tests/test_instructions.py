from modules.instructions import extract_response, format_example, format_prompt


def test_prompt_has_input_section_only_when_there_is_an_input():
    with_input = format_prompt({"instruction": "Translate.", "input": "Hallo", "output": "Hello"})
    assert with_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nTranslate.\n\n### Input:\nHallo\n\n### Response:\n"
    )
    without = format_prompt({"instruction": "Say hi.", "input": "", "output": "Hi"})
    assert "### Input" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert format_example({"instruction": "Say hi.", "input": "", "output": "Hi"}) == without + "Hi"


def test_extract_response():
    assert extract_response(format_prompt({"instruction": "x"}) + " The answer. ") == "The answer."
