"""The pictures of the "Inside the model" tab: Altair charts (which Streamlit ships) and coloured tokens.

Each function takes plain numbers (pandas tables, lists) and returns something st.altair_chart or
st.html shows; what the numbers mean is computed in modules/inspection.py.
"""
import html

import altair as alt
import pandas as pd


def visible(piece):
    """A token's text with its spaces and line breaks made visible: GPT-2's tokens carry the space
    before a word ("␣moves"), which a learner should see."""
    return piece.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def token_labels(pieces, first_position=0):
    """One label per token for a chart's axis, unique even when a token repeats: "3 ␣moves"."""
    return [f"{first_position + index} {visible(piece)}" for index, piece in enumerate(pieces)]


def token_chips(pieces, token_ids, shades=None, titles=None):
    """HTML for the tokens side by side, each with its id underneath; shades (0 to 1, None for none)
    colour each token's background, titles are the tooltips."""
    chips = []
    for index, (piece, token_id) in enumerate(zip(pieces, token_ids)):
        shade = shades[index] if shades is not None and shades[index] is not None else 0.0
        title = html.escape(titles[index], quote=True) if titles else ""
        chips.append(
            f'<span title="{title}" style="display:inline-block; margin:2px; padding:1px 4px; border-radius:4px;'
            f' text-align:center; border:1px solid #ddd; background:rgba(255,75,0,{min(shade, 1.0):.2f})">'
            f'<span style="white-space:pre; font-family:monospace">{html.escape(visible(piece))}</span><br>'
            f'<small style="opacity:0.6">{token_id}</small></span>'
        )
    return f'<div style="line-height:1.2">{"".join(chips)}</div>'


def probability_bars(table, label="token", series=("model", "sampled from")):
    """Horizontal bars, one group per row of `table` (in its order): its `series` columns side by side."""
    long = table.melt(id_vars=[label], value_vars=list(series), var_name="distribution", value_name="probability")
    return alt.Chart(long).mark_bar().encode(
        x=alt.X("probability:Q", axis=alt.Axis(format="%")),
        y=alt.Y(f"{label}:N", sort=list(table[label]), title=None),
        yOffset=alt.YOffset("distribution:N", sort=list(series)),
        color=alt.Color("distribution:N", sort=list(series), legend=alt.Legend(orient="top", title=None)),
        tooltip=[label, "distribution", alt.Tooltip("probability:Q", format=".2%")],
    ).properties(height={"step": 8, "for": "offset"})  # each bar 8 pixels high


def attention_heatmap(weights, labels, first_position=0):
    """(tokens, tokens) weights as a triangle: row i, the token that looks; column j <= i, the token it
    looks at. The cells above the diagonal (the future, weight 0) are left out. The first row and column
    are the token at `first_position` of the text."""
    cells = pd.DataFrame(
        [(labels[query], labels[key], first_position + query, first_position + key, float(weights[query][key]))
         for query in range(len(labels)) for key in range(query + 1)],
        columns=["token", "looks at", "query position", "key position", "weight"],
    )
    return alt.Chart(cells).mark_rect().encode(
        x=alt.X("looks at:N", sort=labels, axis=alt.Axis(labelAngle=-60)),
        y=alt.Y("token:N", sort=labels),
        color=alt.Color("weight:Q", scale=alt.Scale(domain=[0, 1], range=["white", "#08306b"]),
                        legend=alt.Legend(format="%")),
        tooltip=["token", "looks at", alt.Tooltip("weight:Q", format=".1%")],
    ).properties(height=alt.Step(22))


def bar_chart(labels, values, value_name):
    """A horizontal bar for each label, in the labels' order, its length the value (a fraction)."""
    table = pd.DataFrame({"label": labels, value_name: [float(value) for value in values]})
    return alt.Chart(table).mark_bar().encode(
        x=alt.X(f"{value_name}:Q", axis=alt.Axis(format="%")),
        y=alt.Y("label:N", sort=labels, title=None),
        tooltip=["label", alt.Tooltip(f"{value_name}:Q", format=".1%")],
    )
