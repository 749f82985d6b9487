"""The "Inside the model" tab: for the text in the text box, what the model computes and why it picks
its next token. The numbers come from modules/inspection.py, the pictures from charts.py.

Nothing here changes the model, which every session shares (app.py loads it once): the tokens a user
appends with "Append a token" live in that user's st.session_state.
"""
import math

import pandas as pd
import streamlit as st
import torch

from modules.classification import class_numbers, encode_for_classification
from modules.generation import pick_next_token
from modules.inspection import inspect_prompt, prompt_token_ids, sampling_probabilities, token_pieces
from modules.tokenizer import get_tokenizer

from .charts import attention_heatmap, bar_chart, probability_bars, token_chips, token_labels, visible

TOP_TOKENS = 10  # rows of the next-token table; the rest of the vocabulary is one more row
MAX_MAP_TOKENS = 40  # the attention map shows the last tokens only, so that its labels stay legible
MEAN_OVER_HEADS = "mean over heads"
DISTRIBUTIONS = ("model", "after temperature", "sampled from")
PERCENT = st.column_config.NumberColumn(format="percent")


def show_language_model_inside(model, prompt, settings, kind):
    """Kinds "lm" and "instruct": the prompt's tokens and their surprise, the distribution of the next
    token under the sidebar's `settings`, and the attention maps."""
    token_ids = with_appended_tokens(prompt, model.config["context_size"], f"{kind}_appended")
    inspection = inspect_prompt(model, token_ids)
    pieces = token_pieces(token_ids)
    st.subheader("1. The tokens, and how surprising each was")
    show_surprise(inspection, pieces)
    st.subheader("2. The next token")
    show_next_token(inspection, settings, f"{kind}_appended")
    st.subheader("3. Where each token looks: attention")
    weights = chosen_attention(inspection, kind)
    first = max(0, len(pieces) - MAX_MAP_TOKENS)
    st.altair_chart(attention_heatmap(weights[first:, first:].tolist(), token_labels(pieces[first:], first), first))
    rows = (f"The last {MAX_MAP_TOKENS} of the {len(pieces)} tokens are shown; what a row lacks of 100% goes to "
            "earlier tokens." if first else "Each row sums to 100%.")
    st.caption(f"Row: a token; column: an earlier token it takes information from, and how much. {rows} The "
               "upper triangle is empty: a token never sees the tokens after it.")


def show_classifier_inside(model, text, settings):
    """Kind "classifier": the message's tokens, each label's probability, and where the last token looks.
    settings: the label names and max length of the checkpoint (modules.classification.classifier_settings)."""
    max_length = settings["max_length"] or model.config["context_size"]
    token_ids = encode_for_classification([text], max_length)[0][0].tolist()
    inspection = inspect_prompt(model, token_ids)
    pieces = token_pieces(token_ids)
    st.subheader("1. The tokens")
    st.html(token_chips(pieces, token_ids))
    st.caption(f"The message as GPT-2 reads it: each token's text and id; at most {max_length} tokens are read.")
    st.subheader("2. The verdict")
    probabilities = inspection.logits[-1].softmax(dim=-1).tolist()
    labels = settings["label_names"] or class_numbers(len(probabilities))
    st.altair_chart(bar_chart(labels, probabilities, "probability"))
    st.caption(f"The classifier reads the last token, “{visible(pieces[-1])}”: attention only looks back, so it "
               "is the one token that has seen the whole message.")
    st.subheader("3. What the last token looks at")
    weights = chosen_attention(inspection, "classifier", default_layer=len(inspection.attention))
    st.altair_chart(bar_chart(token_labels(pieces), weights[-1].tolist(), "attention"))
    st.caption("How much the last token takes from each token of the message, in the layer picked (the last, "
               "whose output the classifier reads, unless you pick another).")


def with_appended_tokens(prompt, context_size, key):
    """The prompt's token ids followed by those this session appended to it (forgotten when the prompt
    changes), at most the context's last tokens."""
    steps = st.session_state.setdefault(key, {"prompt": prompt, "token_ids": []})
    if steps["prompt"] != prompt:
        steps.update(prompt=prompt, token_ids=[])
    return (prompt_token_ids(prompt, context_size) + steps["token_ids"])[-context_size:]


def show_surprise(inspection, pieces):
    """The tokens coloured by the model's loss on each: what it found easy to predict, and what not."""
    bits = inspection.surprise_bits().tolist()
    blind_guess = math.log2(inspection.logits.shape[-1])
    titles = ["the first token: nothing before it to predict it from"]
    titles += [f"{bit:.1f} bits: the model gave it {2 ** -bit:.2%}" for bit in bits]
    st.html(token_chips(pieces, inspection.token_ids, [None] + [bit / blind_guess for bit in bits], titles))
    average = f" On average {sum(bits) / len(bits):.1f} bits a token." if bits else ""
    st.caption(f"The text as GPT-2 reads it: each token's text and id, coloured by how surprised the model was to "
               f"see it after the tokens before it (its loss, in bits; hover for the number): white, expected; "
               f"orange, as surprised as a blind guess among all {inspection.logits.shape[-1]:,} tokens "
               f"({blind_guess:.1f} bits).{average}")
    with st.expander("The numbers"):
        st.dataframe(pd.DataFrame({
            "token": [visible(piece) for piece in pieces], "id": inspection.token_ids,
            "surprise (bits)": [None] + bits, "probability it had": [None] + [2 ** -bit for bit in bits],
        }), column_config={"probability it had": PERCENT})


def show_next_token(inspection, settings, key):
    """The distribution of the next token, reshaped by the settings, and a button that draws from it."""
    logits = inspection.logits[-1]
    temperature, top_k, top_p = settings["temperature"], settings["top_k"], settings["top_p"]
    distributions = dict(zip(DISTRIBUTIONS, (logits.softmax(dim=-1), sampling_probabilities(logits, temperature),
                                             sampling_probabilities(logits, temperature, top_k, top_p))))
    table = next_token_table(distributions, min(TOP_TOKENS, len(logits)))
    st.altair_chart(probability_bars(table[:-1], series=DISTRIBUTIONS))
    survivors = int((distributions["sampled from"] > 0).sum())
    st.caption(how_the_settings_reshape(temperature, top_k, top_p, survivors, len(logits)))
    steps = st.session_state[key]
    append, restart = st.columns(2)
    if append.button("Append a token", type="primary", help="draw the next token as generation does, and step on"):
        seed = settings["seed"]
        generator = None if seed is None else torch.Generator().manual_seed(seed + len(steps["token_ids"]))
        steps["token_ids"].append(pick_next_token(logits[None], temperature, top_k, top_p, generator).item())
        st.rerun()
    if steps["token_ids"]:
        appended = get_tokenizer().decode(steps["token_ids"])
        st.caption(f"Appended to the prompt so far: “{appended}” ({len(steps['token_ids'])} tokens).")
        if restart.button("Back to the prompt"):
            steps["token_ids"].clear()
            st.rerun()
    with st.expander("The numbers"):
        st.dataframe(table, hide_index=True, column_config=dict.fromkeys(DISTRIBUTIONS, PERCENT))


def next_token_table(distributions, rows):
    """The `rows` most likely tokens, then one row for all the others: each distribution's probabilities."""
    top = distributions["model"].topk(rows).indices.tolist()
    table = pd.DataFrame({"token": token_labels(token_pieces(top), first_position=1),  # with their rank
                          "id": pd.array(top, dtype="Int64")})
    others = pd.DataFrame({"token": [f"the other {len(distributions['model']) - rows:,} tokens"],
                           "id": pd.array([None], dtype="Int64")})
    for name, probabilities in distributions.items():
        table[name] = probabilities[top].tolist()
        # The others' own sum, not 1 minus the top's, which rounding would leave a hair above 0.
        others[name] = probabilities.index_fill(0, torch.tensor(top), 0.0).sum().item()
    return pd.concat([table, others], ignore_index=True)


def how_the_settings_reshape(temperature, top_k, top_p, survivors, vocab_size):
    """One paragraph that says what the sidebar's settings do to this distribution."""
    if temperature == 0:
        return "Temperature 0 is greedy decoding: the most likely token is always the one taken."
    if temperature == 1:
        reshaped = "Temperature 1 leaves the model's probabilities as they are."
    else:
        effect = "sharpens them: likely tokens become likelier" if temperature < 1 else "flattens them: unlikely tokens gain"
        reshaped = f"Temperature {temperature:g} divides the logits by {temperature:g}, which {effect}."
    cuts = " and ".join(cut for cut in (top_k and f"top-k {top_k}", top_p and f"top-p {top_p:g}") if cut)
    if not cuts:
        return f"{reshaped} Any of the {vocab_size:,} tokens may be drawn."
    return (f"{reshaped} After {cuts}, {survivors:,} of the {vocab_size:,} tokens are left; their probabilities "
            "are scaled up to sum to 100% again, and the next token is drawn from them.")


def chosen_attention(inspection, kind, default_layer=1):
    """The (tokens, tokens) attention weights of the layer (from 1) and head the user picks; the mean over
    the heads unless a head is picked."""
    layers, heads = inspection.attention.shape[:2]
    layer_column, head_column = st.columns(2)
    layer = layer_column.selectbox("Layer", range(1, layers + 1), index=default_layer - 1, key=f"{kind}_layer")
    head = head_column.selectbox("Head", [MEAN_OVER_HEADS, *range(1, heads + 1)], key=f"{kind}_head")
    weights = inspection.attention[layer - 1]
    return weights.mean(dim=0) if head == MEAN_OVER_HEADS else weights[head - 1]
