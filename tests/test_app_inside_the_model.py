"""The app's "Inside the model" tab through AppTest: what it shows is what the model computes, and its
next-token cut is generation's own."""
import pyarrow
import pytest
import torch

from modules import GPTModel
from modules.checkpoint import save_checkpoint
from modules.classification import classify
from modules.datasets.instructions import format_prompt
from modules.generation import pick_next_token, sampling_logits
from modules.inspection import inspect_prompt, prompt_token_ids
from tests.app_helpers import app_model, CLASSIFIER_SETTINGS, CONFIG, save_classifier, save_lm, start_app

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

PROMPT = "Every effort moves you"
DISTRIBUTIONS = ["model", "after temperature", "sampled from"]


def save_peaked_lm(path):
    """An untrained model whose next-token distribution is peaked, so that top-p cuts after a few tokens."""
    torch.manual_seed(0)
    model = GPTModel(CONFIG)
    with torch.no_grad():
        model.final_norm.scale.mul_(20)  # logits 20 times larger: a sharper softmax
    save_checkpoint(path, model, "lm")


def open_tab(at, kind):
    at.session_state[f"{kind}_tab"] = "Inside the model"  # what clicking the tab does
    at.run()
    assert not at.exception, at.exception
    return at


def chart_data(at, index):
    """The table behind the index-th chart on the page, as st.altair_chart sent it."""
    [dataset] = at.get("vega_lite_chart")[index].proto.datasets
    return pyarrow.ipc.open_stream(dataset.data.data).read_pandas()


def inspection_of(path, text):
    model = app_model(path)
    return inspect_prompt(model, prompt_token_ids(text, model.config["context_size"]))


@pytest.fixture
def lm_tab(tmp_path, monkeypatch):
    save_peaked_lm(tmp_path / "lm.pt")
    at = start_app(tmp_path, monkeypatch)
    at.text_area[0].input(PROMPT)
    return open_tab(at, "lm"), inspection_of(tmp_path / "lm.pt", PROMPT)


def test_the_tokens_and_their_surprise(lm_tab):
    at, inspection = lm_tab
    tokens = at.dataframe[0].value
    assert list(tokens["token"]) == ["Every", "␣effort", "␣moves", "␣you"]
    assert list(tokens["id"]) == inspection.token_ids
    assert list(tokens["surprise (bits)"][1:]) == pytest.approx(inspection.surprise_bits().tolist(), rel=1e-4)
    assert all(f">{token_id}</small>" in at.get("html")[0].value for token_id in inspection.token_ids)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 50, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.5)])
def test_the_next_token_survivors_are_generations_own(lm_tab, temperature, top_k, top_p):
    at, inspection = lm_tab
    at.slider(key="lm_temperature").set_value(temperature)
    at.number_input(key="lm_top_k").set_value(top_k)
    at.slider(key="lm_top_p").set_value(top_p).run()
    table = at.dataframe[1].value
    for column in DISTRIBUTIONS:
        assert table[column].sum() == pytest.approx(1.0, abs=1e-5)  # float32 over 50,257 tokens
    expected = sampling_logits(inspection.logits[-1:], temperature, top_k or None, top_p if top_p < 1 else None)[0]
    survivors = set(expected.isfinite().nonzero().flatten().tolist())
    top, others = table[:-1], table.iloc[-1]
    shown = top[top["sampled from"] > 0]
    if len(survivors) < len(top):  # all the survivors are among the rows shown
        assert set(shown["id"]) == survivors and others["sampled from"] == 0
    assert shown["sampled from"].tolist() == pytest.approx(expected.softmax(-1)[shown["id"].tolist()].tolist(), abs=1e-5)
    assert f"{len(survivors):,} of the 50,257 tokens are left" in at.caption[2].value
    bars = chart_data(at, 0)
    assert set(bars["distribution"]) == set(DISTRIBUTIONS) and len(bars) == 3 * len(top)


def test_temperature_zero_is_greedy(lm_tab):
    at, inspection = lm_tab
    at.slider(key="lm_temperature").set_value(0.0).run()
    table = at.dataframe[1].value
    assert table["sampled from"].tolist()[:1] == [1.0] and table["sampled from"][1:].sum() == 0
    assert table["id"][0] == inspection.logits[-1].argmax() and "greedy" in at.caption[2].value


def test_the_attention_map_is_the_models(lm_tab):
    at, inspection = lm_tab
    tokens = len(inspection.token_ids)
    for layer, head, expected in [(None, None, inspection.attention[0].mean(dim=0)), (1, 3, inspection.attention[0, 2])]:
        if head:
            at.selectbox(key="lm_layer").select(layer)
            at.selectbox(key="lm_head").select(head).run()
        cells = chart_data(at, 1)
        assert (cells["key position"] <= cells["query position"]).all()  # causal: nothing above the diagonal
        assert len(cells) == tokens * (tokens + 1) // 2
        assert cells.groupby("query position")["weight"].sum().tolist() == pytest.approx([1.0] * tokens)
        assert cells["weight"].tolist() == pytest.approx(
            [expected[query, key].item() for query in range(tokens) for key in range(query + 1)], abs=1e-5)


def test_a_long_prompt_maps_its_last_tokens(lm_tab):
    at, _ = lm_tab
    at.text_area[0].input(" ".join(["one two three four five six"] * 10)).run()  # 60 tokens, the map shows 40
    cells = chart_data(at, 1)
    assert sorted(set(cells["query position"])) == list(range(20, 60)) and len(cells) == 40 * 41 // 2
    assert "The last 40 of the 60 tokens" in at.caption[-1].value


def test_append_a_token_steps_on_in_this_session_only(tmp_path, monkeypatch, lm_tab):
    at, inspection = lm_tab
    at.number_input(key="lm_seed").set_value(11)
    [append] = at.button
    append.click().run()
    expected = pick_next_token(inspection.logits[-1:], 0.8, 50, None, torch.Generator().manual_seed(11)).item()
    assert at.session_state["lm_appended"]["token_ids"] == [expected]
    assert list(at.dataframe[0].value["id"]) == inspection.token_ids + [expected]
    other_session = open_tab(start_app(tmp_path, monkeypatch), "lm")  # same model, another user
    assert len(other_session.dataframe[0].value) == len(inspection.token_ids)
    at.button[1].click().run()  # "Back to the prompt"
    assert list(at.dataframe[0].value["id"]) == inspection.token_ids and len(at.button) == 1
    at.text_area[0].input("A new prompt").run()
    assert at.session_state["lm_appended"] == {"prompt": "A new prompt", "token_ids": []}


def test_instruct_inspects_the_alpaca_prompt(tmp_path, monkeypatch):
    save_lm(tmp_path / "instruct.pt", kind="instruct")
    at = start_app(tmp_path, monkeypatch)
    at.text_area[0].input("Name a colour.")
    at.text_area[1].input("")
    open_tab(at, "instruct")
    inspection = inspection_of(tmp_path / "instruct.pt", format_prompt({"instruction": "Name a colour.", "input": ""}))
    assert list(at.dataframe[0].value["id"]) == inspection.token_ids


def test_the_classifier_shows_its_labels_and_where_the_last_token_looks(tmp_path, monkeypatch):
    save_classifier(tmp_path / "spam.pt")
    at = start_app(tmp_path, monkeypatch)
    message = "Free entry in a weekly competition!"
    at.text_area[0].input(message)
    open_tab(at, "classifier")
    labels = chart_data(at, 0)
    label, probability = classify(app_model(tmp_path / "spam.pt"), message, **CLASSIFIER_SETTINGS)
    assert labels["label"].tolist() == ["ham", "spam"] and labels["probability"].sum() == pytest.approx(1.0)
    assert labels.set_index("label")["probability"][label] == pytest.approx(probability, abs=1e-5)
    inspection = inspection_of(tmp_path / "spam.pt", message)
    attention = chart_data(at, 1)
    assert at.selectbox(key="classifier_layer").value == CONFIG["num_layers"]  # the last layer
    assert attention["attention"].tolist() == pytest.approx(inspection.attention[-1].mean(dim=0)[-1].tolist(), abs=1e-5)


@pytest.mark.parametrize("save, kind", [(save_lm, "lm"), (save_classifier, "classifier")])
def test_a_blank_text_asks_for_one(tmp_path, monkeypatch, save, kind):
    save(tmp_path / "model.pt")
    at = start_app(tmp_path, monkeypatch)
    at.text_area[0].input("  ")
    open_tab(at, kind)
    assert "first" in at.warning[0].value and not at.get("vega_lite_chart")
