"""A Streamlit app over every checkpoint: text completion, instruction following, spam detection.

    streamlit run app.py                                  # checkpoints under checkpoints/
    streamlit run app.py -- --checkpoints-dir DIR --device cpu

The checkpoint's kind picks the page: "lm" completes a text, "instruct" answers an instruction in the
Alpaca format, "classifier" labels a message. Beside each, the "Inside the model" tab shows what the
model computes for that text (app_pages/inside_the_model.py). Everything else comes from modules/.

Several browser sessions may use the app at once (a classroom: tests/test_app_load.py): each model is
loaded once and shared read-only, and what one session changes (appended tokens, widget values) lives in
its own st.session_state. The server holds at most --max-models models; when a session asks for more, or
for one larger than the free memory, its page says so and the other sessions go on.
"""
import argparse
import dataclasses
import functools
import itertools
import re
import sys
from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from app_pages.inside_the_model import show_classifier_inside, show_language_model_inside
from modules.checkpoint import KINDS, CheckpointError, open_checkpoint, read_checkpoint
from modules.classification import classifier_settings, classify
from modules.device import get_device
from modules.errors import UserError, check_flag
from modules.generation import prompt_ids, stream_text
from modules.model_shelf import ModelShelf, check_fits_in_memory, out_of_memory
from modules.speed import CompiledDecoder, add_generation_args, decoder_for, generation_dtype, prepare_for_generation
from modules.datasets.instructions import format_prompt

# Sampling makes a small pretrained model read better; instruction tuning is judged on greedy answers,
# as in the original. Each kind keeps its own widget values.
GENERATION_DEFAULTS = {
    "lm": {"max_new_tokens": 100, "temperature": 0.8, "top_k": 50},
    "instruct": {"max_new_tokens": 256, "temperature": 0.0, "top_k": 0},
}
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:&])")
RESUME_SUFFIX = ".last.pt"  # the training scripts' resume files: the last step, not the best model
INSIDE_THE_MODEL = "Inside the model"


def build_parser():
    parser = argparse.ArgumentParser(
        description="Streamlit app over the checkpoints: run it with `streamlit run app.py [-- FLAGS]`.",
        allow_abbrev=False,
    )
    parser.add_argument("--checkpoints-dir", default="checkpoints",
                        help="folder searched recursively for *.pt checkpoints (default: checkpoints)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--max-models", type=int, default=2,
                        help="models the server holds at once, shared by all sessions (default: %(default)s)")
    add_generation_args(parser, compile_by_default=True)
    return parser


def find_checkpoints(folder):
    """Every *.pt under `folder`, as paths relative to it; hidden files and folders (such as the
    temporary files of a checkpoint being written) are skipped."""
    folder = Path(folder)
    paths = (path.relative_to(folder) for path in folder.rglob("*.pt") if path.is_file())
    return sorted(str(path) for path in paths if not any(part.startswith(".") for part in path.parts))


@functools.lru_cache(maxsize=1024)
def checkpoint_kind(path, mtime_ns):
    """The kind of the checkpoint at `path`, or None when it cannot be used. Only the header is read
    (mmap), so listing large checkpoints stays instant; mtime_ns renews the answer when the file changes."""
    try:
        return read_checkpoint(path, kinds=KINDS, mmap=True)["kind"]
    except CheckpointError:
        return None


@st.cache_resource
def model_shelf(limit):
    """The one ModelShelf of this server, whichever session asks."""
    return ModelShelf(limit)


@dataclasses.dataclass
class ServedModel:
    """A checkpoint as the app serves it to every session: its model, kind and metadata (as
    LoadedCheckpoint's) and, with --compile, the CompiledDecoder its generating pages answer with."""

    model: object
    kind: str
    metadata: dict
    decoder: CompiledDecoder | None


def load_model(path, device, dtype_name, compiled=False):
    """The checkpoint at `path` as a ServedModel, checked first to fit in the free memory; shared by all
    sessions (read-only after this)."""
    check_fits_in_memory(path)
    with st.spinner("Loading the model..."):
        loaded = open_checkpoint(path, device=device, kinds=KINDS)
        prepare_for_generation(loaded.model, dtype_name)
    generating = loaded.kind in GENERATION_DEFAULTS
    served = ServedModel(loaded.model, loaded.kind, loaded.metadata, decoder_for(loaded.model, compiled and generating))
    if served.decoder:
        # Built once per model, while the first answers come from the eager step: the step for a prompt of
        # up to 64 tokens at the default length, which shorter prompts use too; longer ones are built when
        # first asked for.
        served.decoder.ready_or_build_in_background(1, 64 + GENERATION_DEFAULTS[loaded.kind]["max_new_tokens"])
    return served


def stream_answer(model, prompt, settings, decoder):
    """stream_text(model, prompt, **settings) with the compiled `decoder` (None with --no-compile) once its
    step is built for this length (in the background, meanwhile the eager step answers); a caption says
    which one answered."""
    input_ids = prompt_ids(prompt, next(model.parameters()).device)
    tokens = input_ids.shape[1] + settings["max_new_tokens"]
    compiled = decoder is not None and decoder.ready_or_build_in_background(1, tokens)
    st.caption("Answered by the compiled decoding step." if compiled else "Answered by the eager step"
               + ("; the compiled one is being built." if decoder and not decoder.failed else "."))
    return stream_text(model, input_ids, **settings, decoder=decoder if compiled else None)


def plain_text_as_markdown(text):
    """Generated text is plain text, but st.write_stream renders Markdown: escape its special characters
    and keep single line breaks, which Markdown would join into one line."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("\n", "  \n")


def show_how_to_make_a_checkpoint(folder):
    st.info(f"No checkpoint found in `{Path(folder).resolve()}` yet. Make one, then reload this page:")
    st.code(
        "python train.py                     # pretrain a small GPT (minutes on a CPU)\n"
        "python get_gpt_weights.py --model 124M --save checkpoints/gpt2-124M.pt\n"
        "python fine_tune_classifier.py      # a spam classifier\n"
        "python fine_tune_instructional.py   # an instruction follower",
        language="bash",
    )
    st.caption("Checkpoints elsewhere: `streamlit run app.py -- --checkpoints-dir DIR`.")


def pick_checkpoint(folder, names):
    """The sidebar's checkpoint picker. Best checkpoints come first and the newest usable one is picked;
    resume files (*.last.pt) are listed after them only when asked for, or when there is nothing else.
    Unreadable files are listed as such."""
    best = [name for name in names if not name.endswith(RESUME_SUFFIX)]
    resume_files = [name for name in names if name.endswith(RESUME_SUFFIX)]
    show_resume_files = not best
    if best and resume_files:
        show_resume_files = st.sidebar.toggle(
            "Show resume files", key="show_resume_files",
            help="*.last.pt: the last training step with its optimizer state, for --resume; the best model is "
                 "the file without .last")
    listed = best + resume_files if show_resume_files else best
    mtimes = {name: Path(folder, name).stat().st_mtime_ns for name in listed}
    kinds = {name: checkpoint_kind(str(Path(folder, name)), mtimes[name]) for name in listed}
    usable = [name for name in listed if kinds[name]] or listed
    newest = max(usable, key=lambda name: (name in best, mtimes[name]))
    name = st.sidebar.selectbox("Checkpoint", listed, index=listed.index(newest), key="checkpoint",
                                format_func=lambda name: f"{name} · {kinds[name] or 'unreadable'}")
    return Path(folder, name)


def generation_settings(kind):
    """Sidebar controls, returned as stream_text's keyword arguments."""
    defaults = GENERATION_DEFAULTS[kind]
    sidebar = st.sidebar
    max_new_tokens = sidebar.slider("Max new tokens", 1, 1024, defaults["max_new_tokens"], key=f"{kind}_tokens")
    temperature = sidebar.slider("Temperature", 0.0, 2.0, defaults["temperature"], step=0.05,
                                 key=f"{kind}_temperature", help="0 is greedy: always the most likely token")
    top_k = sidebar.number_input("Top-k", 0, 50257, defaults["top_k"], key=f"{kind}_top_k",
                                 help="sample among the k most likely tokens; 0 = all")
    top_p = sidebar.slider("Top-p", 0.05, 1.0, 1.0, step=0.05, key=f"{kind}_top_p",
                           help="sample among the most likely tokens that together reach p; 1 = all")
    seed = sidebar.number_input("Seed", min_value=0, value=None, step=1, placeholder="random", key=f"{kind}_seed",
                                help="the same seed and settings give the same text (sampling only)")
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k or None,
            "top_p": top_p if top_p < 1.0 else None, "seed": seed}


def clicked_action_tab(kind, action, text, what, show_inside):
    """The page's two tabs: `action` (a button of that name) and "Inside the model", which calls
    show_inside(). Only the open tab runs, so each costs nothing while the other is in use.

    Returns the action's tab when its button was clicked on a `text` that is not blank (the caller
    fills the tab with the result), else None. A blank text gets a warning to type `what` first."""
    action_tab, inside_tab = st.tabs([action, INSIDE_THE_MODEL], key=f"{kind}_tab", on_change="rerun")
    if inside_tab.open:
        with inside_tab:
            if has_text(text, what):
                show_inside()
        return None
    with action_tab:
        clicked = st.button(action, type="primary") and has_text(text, what)
    return action_tab if clicked else None


def has_text(text, what):
    """Whether `text` holds more than blanks; if not, a warning asks to type `what` first."""
    if text.strip():
        return True
    st.warning(f"Type {what} first.")
    return False


def complete_text(served):
    """kind "lm": the prompt followed by its continuation, streamed as it is generated."""
    model = served.model
    settings = generation_settings("lm")
    prompt = st.text_area("Prompt", "Every effort moves you")
    tab = clicked_action_tab("lm", "Generate", prompt, "a prompt",
                             lambda: show_language_model_inside(model, prompt, settings, "lm"))
    if tab:
        with tab:
            pieces = itertools.chain([prompt], stream_answer(model, prompt, settings, served.decoder))  # caption first
            with st.container(border=True, key="output"):
                st.write_stream(plain_text_as_markdown(piece) for piece in pieces)


def follow_instruction(served):
    """kind "instruct": the original's Alpaca prompt; the answer ends at <|endoftext|>."""
    model = served.model
    settings = generation_settings("instruct")
    instruction = st.text_area("Instruction", "Rewrite the sentence using a simile.")
    input_text = st.text_area("Input (optional)", "The car is very fast.")
    prompt = format_prompt({"instruction": instruction, "input": input_text.strip()})
    tab = clicked_action_tab("instruct", "Answer", instruction, "an instruction",
                             lambda: show_language_model_inside(model, prompt, settings, "instruct"))
    if tab:
        with tab:
            with st.expander("The prompt the model sees"):
                st.text(prompt)
            pieces = stream_answer(model, prompt, settings, served.decoder)  # its caption above the box
            with st.container(border=True, key="output"):
                st.write_stream(plain_text_as_markdown(piece) for piece in pieces)


def detect_spam(served):
    """kind "classifier": the most likely label of a message and its probability, with the label names
    and the message length the classifier was trained with."""
    model, settings = served.model, classifier_settings(served.metadata)
    if settings["label_names"]:
        st.caption(f"Labels: {', '.join(settings['label_names'])}")
    text = st.text_area("Message", "You are a winner! Claim your free prize now by calling 0800 123 456.")
    tab = clicked_action_tab("classifier", "Classify", text, "a message",
                             lambda: show_classifier_inside(model, text, settings))
    if tab:
        label, probability = classify(model, text, **settings)
        verdict, confidence = tab.columns(2)
        verdict.metric("Verdict", label)
        confidence.metric("Probability", f"{probability:.1%}")


# Each page takes the ServedModel (model, kind, metadata, decoder).
PAGES = {"lm": complete_text, "instruct": follow_instruction, "classifier": detect_spam}
TITLES = {"lm": "Text completion", "instruct": "Instruction following", "classifier": "Spam detector"}


def main():
    st.set_page_config(page_title="GPT-2 from scratch", page_icon="✍️")
    st.title("GPT-2 from scratch")
    args, unknown = build_parser().parse_known_args(sys.argv[1:])
    if unknown:
        st.warning(f"Ignored unknown arguments: {' '.join(unknown)} (`python app.py --help` lists the flags)")
    names = find_checkpoints(args.checkpoints_dir)
    if not names:
        show_how_to_make_a_checkpoint(args.checkpoints_dir)
        return
    path = pick_checkpoint(args.checkpoints_dir, names)
    try:
        check_flag("max_models", args.max_models, lambda limit: limit >= 1, ">= 1")
        device = get_device(args.device)
        key = (str(path), path.stat().st_mtime_ns, str(device), args.dtype, args.compile)
        with model_shelf(args.max_models).borrow(key, lambda: load_model(path, device, args.dtype, args.compile),
                                                path.name) as loaded:
            show_model(loaded, path, device)
    except UserError as error:  # CheckpointError included: the other checkpoints stay usable
        st.error(str(error))
    except Exception as error:
        if not out_of_memory(error):
            raise
        st.error(f"the server ran out of memory for {path.name}; try a shorter text, or again when fewer sessions "
                 "are generating (the other sessions go on)")


def show_model(loaded, path, device):
    model = loaded.model
    parameters = sum(parameter.numel() for parameter in model.parameters())
    st.header(TITLES[loaded.kind])
    st.caption(f"`{path}` · {loaded.kind} · {parameters / 1e6:.1f}M parameters · {device} · {generation_dtype(model)}")
    PAGES[loaded.kind](loaded)


if __name__ == "__main__":
    if get_script_run_ctx(suppress_warning=True) is not None:  # under `streamlit run` (or AppTest)
        main()
    else:
        # `python app.py [FLAGS]`: answer --help and reject unknown flags here, then start the server.
        build_parser().parse_args()
        from streamlit.web import cli

        sys.argv = ["streamlit", "run", __file__, "--", *sys.argv[1:]]
        sys.exit(cli.main())
