"""A classroom on one app: 20 sessions at once against one `streamlit run app.py`, each generating from the
same checkpoint, some opening "Inside the model".

Each session speaks Streamlit's own websocket protocol, as the browser's page does (a script run is asked
for with the widgets' values; the page's elements come back as they are drawn), which costs a fraction of
20 Chromium pages. Every session must get its own text and no error; the server must hold one copy of the
model (its peak memory with 20 sessions against its peak with one); the time to the first token at the
50th and 95th percentile is printed (benchmarks/README.md, "A classroom on one app"). The app's default,
the step compiled in the background, meets the class twice: while it is being built, and once built."""
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

import modules.checkpoint
from app import GENERATION_DEFAULTS, INSIDE_THE_MODEL, plain_text_as_markdown
from modules.errors import UserError
from modules.generation import stream_text
from modules.model_shelf import ModelShelf
from tests.app_helpers import EXACT, app_model, save_lm, served_app, start_app

websockets = pytest.importorskip("websockets")
from streamlit.proto.BackMsg_pb2 import BackMsg  # noqa: E402
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg  # noqa: E402
from streamlit.proto.Alert_pb2 import Alert  # noqa: E402

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

SESSIONS = 20
OPENS_INSIDE = 4  # every 4th session also opens "Inside the model"
NEW_TOKENS = 16
PROMPT = "Every effort moves you"
STEP_TIMEOUT = 240  # seconds a script run may take on 2 busy cores with 20 sessions
# How each kind of widget sends its value (WidgetState's field), and how it is named on the page.
VALUE_FIELDS = {"button": "trigger_value", "text_area": "string_value", "number_input": "int_value",
                "slider": "double_array_value", "tab_container": "string_value"}


class Session:
    """One learner's tab: asks the server for script runs with widget values, as the page does, and keeps
    what each run draws."""

    def __init__(self, url):
        self.url = url.replace("http://", "ws://") + "/_stcore/stream"
        self.widgets = {}  # label -> (widget id, WidgetState field)

    async def __aenter__(self):
        self.socket = await websockets.connect(self.url, subprotocols=["streamlit"], max_size=None)
        return self

    async def __aexit__(self, *exception):
        await self.socket.close()

    async def run(self, **values):
        """Rerun the script with `values` {widget label: value}; returns [(seconds since asking, kind, element)]
        for every element drawn, once the run has finished."""
        message = BackMsg()
        message.rerun_script.query_string = ""
        for label, value in values.items():
            widget_id, field = self.widgets[label]
            state = message.rerun_script.widget_states.widgets.add(id=widget_id)
            if field == "double_array_value":
                state.double_array_value.data.extend(value)
            else:
                setattr(state, field, value)
        start = time.monotonic()
        await self.socket.send(message.SerializeToString())
        drawn = []
        while True:
            reply = ForwardMsg()
            reply.ParseFromString(await asyncio.wait_for(self.socket.recv(), STEP_TIMEOUT))
            kind = reply.WhichOneof("type")
            if kind == "script_finished":
                return drawn
            if kind == "delta":
                self._learn_widget(reply.delta)
                if reply.delta.WhichOneof("type") == "new_element":
                    element = reply.delta.new_element
                    drawn.append((time.monotonic() - start, element.WhichOneof("type"), getattr(element, element.WhichOneof("type"))))

    def _learn_widget(self, delta):
        if delta.WhichOneof("type") == "add_block" and delta.add_block.WhichOneof("type") == "tab_container":
            self.widgets["tabs"] = (delta.add_block.tab_container.id, VALUE_FIELDS["tab_container"])
        elif delta.WhichOneof("type") == "new_element":
            kind = delta.new_element.WhichOneof("type")
            if kind in VALUE_FIELDS:
                element = getattr(delta.new_element, kind)
                self.widgets[element.label] = (element.id, VALUE_FIELDS[kind])


def errors_in(drawn):
    """What a run showed as an error: an exception, or an st.error."""
    return [str(element) for _, kind, element in drawn
            if kind == "exception" or (kind == "alert" and element.format == Alert.ERROR)]


def captions(drawn):
    return [element.body for _, kind, element in drawn if kind == "markdown" and element.body.startswith("Answered by")]


def generated(drawn):
    """(seconds to the first generated token, the whole text shown) of a Generate run."""
    shown = [(seconds, element.body) for seconds, kind, element in drawn
             if kind == "markdown" and element.body.startswith(plain_text_as_markdown(PROMPT))]
    assert shown, "no generated text was drawn"
    first_token = next((seconds for seconds, body in shown if len(body) > len(plain_text_as_markdown(PROMPT))), None)
    return first_token, shown[-1][1]


async def learner(url, seed, opens_inside, everyone_ready):
    """A session: open the page, wait for the class, generate with `seed`, perhaps look inside the model.
    Returns (seconds to the first token, text shown, the errors any run showed, which step answered)."""
    async with Session(url) as session:
        errors = errors_in(await session.run())
        await everyone_ready()
        settings = {"Prompt": PROMPT, "Seed": seed, "Max new tokens": [NEW_TOKENS]}
        first_token, text = generated(drawn := await session.run(**settings, Generate=True))
        errors += errors_in(drawn)
        answered_by = captions(drawn)
        if opens_inside:
            drawn = await session.run(**settings, tabs=INSIDE_THE_MODEL)
            errors += errors_in(drawn)
            assert any(kind == "heading" and element.body.startswith("1. The tokens") for _, kind, element in drawn)
        return first_token, text, errors, answered_by


async def classroom(url, seeds):
    """Every learner at once, clicking Generate together once all of them have the page."""
    ready, all_ready = [0], asyncio.Event()

    async def everyone_ready():
        ready[0] += 1
        if ready[0] == len(seeds):
            all_ready.set()
        await all_ready.wait()

    return await asyncio.gather(*(learner(url, seed, index % OPENS_INSIDE == 0, everyone_ready)
                                  for index, seed in enumerate(seeds)))


def peak_memory_mib(pid):
    """The process's peak resident memory so far (Linux's VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="the server's peak memory is read from /proc (Linux)")
def test_twenty_sessions_at_once_each_get_their_text_from_one_copy_of_the_model(tmp_path):
    folder = tmp_path / "checkpoints"
    save_lm(folder / "pretrained.pt")
    model = app_model(folder / "pretrained.pt")
    model_mib = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()) / 2**20
    expected = expected_texts(model)
    server = []
    with served_app(folder, tmp_path / "streamlit.log", started=server) as url:
        # One session first: it loads the model, as the first learner's would.
        (alone, text, errors, _), = asyncio.run(classroom(url, [SESSIONS]))
        assert not errors and text == expected[SESSIONS]
        one_session_mib = peak_memory_mib(server[0].pid)
        results = asyncio.run(classroom(url, list(range(SESSIONS))))
        class_mib = peak_memory_mib(server[0].pid)
    assert_each_got_its_text(results, expected)
    first_tokens = sorted(first_token for first_token, *_ in results)
    twentieths = statistics.quantiles(first_tokens, n=20, method="inclusive")
    p50, p95 = twentieths[9], twentieths[18]
    print(f"\n{SESSIONS} sessions at once ({SESSIONS // OPENS_INSIDE} also inside the model), {NEW_TOKENS} new tokens "
          f"each: time to the first token p50 {p50:.2f} s, p95 {p95:.2f} s (one session alone: {alone:.2f} s); "
          f"server peak memory {class_mib:.0f} MiB against {one_session_mib:.0f} MiB with one session "
          f"(the model: {model_mib:.0f} MiB, so {(class_mib - one_session_mib) / model_mib:.1f} models' worth more)")
    # A copy of the model per session would add 19 of them; what each session holds besides (its generation's
    # buffers, its thread's allocator, Streamlit's state) is a few MiB.
    assert class_mib - one_session_mib < (SESSIONS - 1) * model_mib / 4


def expected_texts(model):
    """{seed: the text a session shows} as the eager path generates it in float32."""
    settings = {**GENERATION_DEFAULTS["lm"], "max_new_tokens": NEW_TOKENS}
    return {seed: plain_text_as_markdown(PROMPT + "".join(stream_text(model, PROMPT, **settings, seed=seed)))
            for seed in range(SESSIONS + 1)}


def assert_each_got_its_text(results, expected):
    for seed, (_, text, errors, _) in enumerate(results):
        assert not errors, f"session {seed} showed: {errors}"
        assert text == expected[seed], f"session {seed} got another text"


def test_twenty_sessions_at_once_while_the_step_compiles_and_once_it_is_built(tmp_path):
    # The app's default, with float32 to compare the texts with the eager path's: the class generates while
    # the first session's background build runs (the eager step answers; the build's first call checks every
    # guard meanwhile), then, once a session is answered by the compiled step, all twenty on it at once.
    folder = tmp_path / "checkpoints"
    save_lm(folder / "pretrained.pt")
    expected = expected_texts(app_model(folder / "pretrained.pt"))
    flags = [flag for flag in EXACT if flag != "--no-compile"]
    with served_app(folder, tmp_path / "streamlit.log", flags=flags) as url:
        while_building = asyncio.run(classroom(url, list(range(SESSIONS))))
        deadline = time.monotonic() + STEP_TIMEOUT
        while "Answered by the compiled decoding step." not in asyncio.run(classroom(url, [SESSIONS]))[0][3]:
            assert time.monotonic() < deadline, "the compiled step was not built in time"
            time.sleep(1)
        built = asyncio.run(classroom(url, list(range(SESSIONS))))
    assert_each_got_its_text(while_building, expected)
    assert_each_got_its_text(built, expected)
    assert all(answered_by == ["Answered by the compiled decoding step."] for *_, answered_by in built)


# ----------------------------------------------------------------------------- when the app runs out
def test_the_shelf_loads_each_model_once_and_refuses_one_more_while_all_are_in_use():
    loads = []

    def loader(name):
        def load():
            loads.append(name)
            time.sleep(0.05)  # long enough for the other threads to ask meanwhile
            return object()
        return load

    shelf = ModelShelf(limit=1)
    models = []

    def borrow_a():
        with shelf.borrow("a", loader("a"), "a.pt") as model:
            models.append(model)

    threads = [threading.Thread(target=borrow_a) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["a"] and len(set(map(id, models))) == 1  # eight sessions at once, one copy

    with shelf.borrow("a", loader("a"), "a.pt"):
        with pytest.raises(UserError, match=r"1 places for models are all in use by other sessions \(a.pt\), "
                                            r"so it cannot load b.pt now"):
            with shelf.borrow("b", loader("b"), "b.pt"):
                pass
    with shelf.borrow("b", loader("b"), "b.pt"):  # "a" is idle now: it makes room
        assert list(shelf.places) == ["b"]
    with pytest.raises(RuntimeError):
        with shelf.borrow("c", lambda: (_ for _ in ()).throw(RuntimeError("corrupt")), "c.pt"):
            pass
    assert "c" not in shelf.places  # a load that failed takes no place
    with shelf.borrow("a", loader("a"), "a.pt"):
        pass
    assert loads == ["a", "b", "a"]


def test_a_model_larger_than_the_free_memory_or_an_allocation_that_fails_is_told_on_the_page(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    save_lm(folder / "pretrained.pt")
    with open(folder / "huge.pt", "wb") as huge:  # a sparse file of a tebibyte: no disk, but its size is read
        huge.truncate(2**40)
    at = start_app(folder, monkeypatch)
    at.selectbox(key="checkpoint").set_value("huge.pt").run()
    assert not at.exception
    assert "huge.pt needs about 1,048,576 MiB of memory and the server has" in at.error[0].value
    at.selectbox(key="checkpoint").set_value("pretrained.pt").run()  # the other models go on
    assert not at.exception and not at.error and at.header[0].value == "Text completion"

    def allocation_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    save_lm(folder / "other.pt", seed=2)
    monkeypatch.setattr(modules.checkpoint, "open_checkpoint", allocation_fails)
    at = start_app(folder, monkeypatch)
    assert not at.exception and "the server ran out of memory for other.pt" in at.error[0].value
