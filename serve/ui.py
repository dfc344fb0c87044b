"""The Gradio web UI: Chat, Compare (side by side, blind A/B), Adapters and Train tabs. The only
module that imports gradio (docs/ui.md).

Every action calls `serve.service.Service` (or the Train tab's `serve.training_runs.TrainingRuns`);
nothing here holds model or adapter state, and what the tabs compute lives in gradio-free modules
(`serve.ui_logic`, `serve.train_view`, `serve.token_view`, `serve.preferences`). The conversation
lives in a per-session gr.State as (role, content, adapter) turns, so the chat history shows which
adapter or mix wrote each reply, and switching adapters mid-conversation is allowed.
"""

from __future__ import annotations

import html
import secrets
import time
from pathlib import Path

import gradio as gr

from adapters import Message
from serve.preferences import CHOICES, PreferenceLog
from serve.registry import BASE_NAME, NoVersionError, UnknownAdapterError
from serve.service import MAX_COMPARE, BusyError, Service, Timing, timed
from serve.train_view import FALLBACK, dataset_choices, dataset_view, loss_rows, progress_text
from serve.training_runs import TrainingRunError, TrainingRuns
from serve.ui_logic import (ADAPTER_HEADERS, MIX_ROWS, PREFERENCE_HEADERS, REGRESSED_HEADERS, VERSION_HEADERS, BlindSession, add_mix_line,
                            adapter_table, answer_column, blind_answer, loss_curve, compare_names, conversation, example_prompts, labelled, marked,
                            move_pointer, preference_rows, sampling, spell_mix, token_view_html, versions_view)

TITLE = "loraswap: one 4-bit base, many QLoRA adapters"
REFUSED = (BusyError, UnknownAdapterError, ValueError)
"""What a request can be refused with before it runs (a full server, an unknown adapter, a bad
parameter or prompt: `serve.engine.RequestError` is a ValueError); the UI shows it as an error."""


def build_ui(service: Service, preferences: PreferenceLog, runs: TrainingRuns | None = None) -> gr.Blocks:
    """The UI over `service`; blind A/B votes go to `preferences`; the Train tab starts `runs` (None: no training)."""
    active: dict[str, list] = {}  # session -> its running streams, for the stop button

    def choices() -> list[tuple[str, str]]:
        return [(service.choice_label(name), name) for name in service.model_names()]

    with gr.Blocks(title=TITLE) as ui:
        gr.Markdown(f"## {TITLE}")
        with gr.Tab("Chat"):
            pickers = _chat_tab(service, choices, active)
        with gr.Tab("Compare"):
            with gr.Tab("Side by side"):
                pickers += _compare_tab(service, choices, active)
            with gr.Tab("Blind A/B"):
                pickers += _blind_tab(service, choices, preferences)
        with gr.Tab("Adapters"):
            _adapters_tab(service, preferences)
        with gr.Tab("Train"):
            _train_tab(ui, runs, choices, pickers)
        _api_endpoints(service)
    return ui


def mount_ui(app, service: Service, access, preferences: PreferenceLog, runs: TrainingRuns | None = None) -> object:
    """Mount the UI at / on the API's FastAPI app, behind a login when there are logins or an API key.

    Gradio's queue gets the service's size limit too: beyond it the UI answers 'queue full'.
    """
    ui = build_ui(service, preferences, runs)
    ui.queue(max_size=service.config.max_queue, default_concurrency_limit=service.config.max_queue)
    message = "Log in with the server's API key as the password (any user name)." if _key_login(access) else None
    return gr.mount_gradio_app(app, ui, path="/", auth=gradio_auth(access), auth_message=message,
                               server_name=access.host, server_port=access.port, footer_links=["api"])


def _key_login(access) -> bool:
    return not access.auth and access.api_key is not None


def gradio_auth(access):
    """Gradio's `auth`: the UI logins; with none but an API key, a check that takes the key as the
    password for any user name (serve/server.py says why); None (no login) without either."""
    if access.auth:
        return list(access.auth)
    if _key_login(access):
        key = access.api_key.encode()
        return lambda _user, password: secrets.compare_digest(password.encode(), key)
    return None


def _mix_builder(choices, prefix: str):
    """An adapter with its strength, and more adapters to mix in, spelled as one `model` string.
    Returns (the pickers, the strength sliders, the spelling box); the box is what requests use."""
    with gr.Row():
        first = gr.Dropdown(choices(), value=BASE_NAME, label="Adapter", elem_id=f"{prefix}-adapter", scale=3)
        strength = gr.Slider(-2, 2, value=1, step=0.05, label="Strength (1 = as trained)", elem_id=f"{prefix}-strength", scale=2)
    pickers, strengths = [first], [strength]
    with gr.Accordion("Mix in more adapters", open=False, elem_id=f"{prefix}-mix"):
        for i in range(1, MIX_ROWS):
            with gr.Row():
                pickers.append(gr.Dropdown(choices(), value=None, label=f"Adapter {i + 1}", elem_id=f"{prefix}-mix-{i}", scale=3))
                strengths.append(gr.Slider(-2, 2, value=1, step=0.05, label="Strength", elem_id=f"{prefix}-mix-strength-{i}", scale=2))
    spelling = gr.Textbox(BASE_NAME, label="Model: the mix in compact spelling (editable: name@version, a*0.5+b)",
                          elem_id=f"{prefix}-spelling")

    def spell(*values):
        try:
            return spell_mix(list(zip(values[:MIX_ROWS], values[MIX_ROWS:])))
        except ValueError as err:
            raise gr.Error(str(err)) from err

    for component in pickers + strengths:
        component.change(spell, pickers + strengths, spelling, api_visibility="private")
    for picker in pickers:
        picker.focus(lambda: gr.Dropdown(choices=choices()), None, picker, api_visibility="private")  # adapters trained since
    return pickers, strengths, spelling


def _examples(service: Service, sources: list, chosen, box, elem_id: str):
    """Clickable example prompts for the adapters `chosen(*values of sources)` names (spellings);
    they follow the sources' changes, and a click fills `box`."""
    found = gr.Dataset(components=[box], samples=[[e] for e in example_prompts(service, BASE_NAME)], label="Examples",
                       elem_id=elem_id, type="values")

    def refresh(*values):
        try:
            return gr.Dataset(samples=[[e] for e in example_prompts(service, chosen(*values))])
        except ValueError:  # a half-typed spelling: keep the examples shown
            return gr.Dataset()

    for source in sources:
        source.change(refresh, sources, found, api_visibility="private")
    found.click(lambda sample: sample[0], found, box, api_visibility="private")
    return found


def _chat_tab(service: Service, choices, active: dict) -> list:
    """The chat; returns its adapter pickers (refreshed when a training run publishes)."""
    turns = gr.State([])
    pickers, _, adapter = _mix_builder(choices, "chat")
    with gr.Row():
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p")
        max_new = gr.Slider(1, service.config.limits.max_new_tokens, value=64, step=1, label="Max new tokens")
    system = gr.Textbox(label="System prompt", lines=1, placeholder="optional")
    chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=380)
    message = gr.Textbox(label="Message", elem_id="chat-message", placeholder="Type and press Enter")
    _examples(service, [adapter], lambda spelling: spelling, message, "chat-examples")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        stop = gr.Button("Stop", elem_id="chat-stop")
        retry = gr.Button("Retry")
        clear = gr.Button("Clear", elem_id="chat-clear")

    def respond(history: list[dict], name: str, system_prompt: str, temp, p, new, request: gr.Request):
        """Stream the reply to the last user turn into a new assistant turn."""
        reply = {"role": "assistant", "content": "", "adapter": name}
        try:
            stream = service.chat(name, conversation(system_prompt, history), sampling(temp, p, new))
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        active[request.session_hash] = [stream]
        try:
            for piece in stream:
                reply["content"] += piece
                yield history + [reply], labelled(history + [reply])
        finally:
            stream.cancel()
            active.pop(request.session_hash, None)
        if stream.result.error:
            raise gr.Error(stream.result.error)
        reply["content"], reply["adapter"] = stream.result.text, stream.result.adapter  # a mix in its canonical spelling
        yield history + [reply], labelled(history + [reply])

    def add_user(history: list[dict], text: str):
        if not text.strip():
            raise gr.Error("type a message first")
        history = history + [{"role": "user", "content": text, "adapter": None}]
        return history, labelled(history), ""

    def drop_last_reply(history: list[dict]):
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if not history:
            raise gr.Error("nothing to retry")
        return history, labelled(history)

    def cancel(request: gr.Request) -> None:
        for stream in active.pop(request.session_hash, []):
            stream.cancel()

    inputs = [turns, adapter, system, temperature, top_p, max_new]
    outputs = [turns, chatbot]
    events = [
        trigger(add_user, [turns, message], [turns, chatbot, message], api_visibility="private").then(respond, inputs, outputs, api_visibility="private")
        for trigger in (send.click, message.submit)
    ]
    events.append(retry.click(drop_last_reply, [turns], outputs, api_visibility="private").then(respond, inputs, outputs, api_visibility="private"))
    stop.click(cancel, None, None, cancels=events, api_visibility="private")  # ends the engine request and the UI stream
    clear.click(lambda: ([], []), None, outputs, api_visibility="private")
    return pickers


def _compare_tab(service: Service, choices, active: dict) -> list:
    with gr.Row():
        picked = gr.CheckboxGroup(choices(), value=[BASE_NAME], label=f"Adapters (2 to {MAX_COMPARE})", elem_id="compare-adapters", scale=4)
        every = gr.Checkbox(label="All", elem_id="compare-all")
    with gr.Accordion("Add a mix or a strength as a column", open=False, elem_id="compare-builder"):
        pickers, _, spelling = _mix_builder(choices, "compare")
        add = gr.Button("Add as a column", elem_id="compare-add-mix")
    mixes = gr.Textbox(label="Mix columns (one spelling per line)", lines=2, elem_id="compare-mixes")
    prompt = gr.Textbox(label="Prompt", elem_id="compare-prompt")
    _examples(service, [picked, mixes], compare_names, prompt, "compare-examples")
    with gr.Row():
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature")
        max_new = gr.Slider(1, service.config.limits.max_new_tokens, value=64, step=1, label="Max new tokens")
        seed = gr.Number(value=0, precision=0, label="Seed")
        tokens = gr.Checkbox(label="Token view: colour each token by how much more likely the adapter made it than the base",
                             elem_id="compare-tokens")
    go = gr.Button("Compare", variant="primary", elem_id="compare-go")
    with gr.Row():
        columns = [gr.HTML(visible=False, elem_id=f"compare-col-{i}", elem_classes=["compare-col"]) for i in range(MAX_COMPARE)]

    def pick_all(checked: bool):
        names = service.model_names()[:MAX_COMPARE] if checked else [BASE_NAME]
        return gr.CheckboxGroup(choices=choices(), value=names)

    def run(picked_names: list[str], mix_lines: str, text: str, temp, new, seed_value, token_view: bool, request: gr.Request):
        names = compare_names(picked_names, mix_lines)
        if not 2 <= len(names) <= MAX_COMPARE:
            raise gr.Error(f"choose 2 to {MAX_COMPARE} adapters or mixes, got {len(names)}")
        if not text.strip():
            raise gr.Error("type a prompt first")
        messages = [Message("user", text)]
        try:
            streams = service.compare(names, messages, sampling(temp, 1.0, new, seed_value, 0 if token_view else None))
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        active[request.session_hash] = streams
        started, timings = time.perf_counter(), [Timing() for _ in names]
        texts = [""] * len(names)
        iterators = [timed(s, started, t) for s, t in zip(streams, timings)]
        try:
            yield from _stream_columns(names, texts, timings, iterators)
        finally:
            for s in streams:
                s.cancel()
            active.pop(request.session_hash, None)
        if token_view:
            shown = [answer_column(s.result.adapter, token_view_html(service, n, messages, s.result), t, True)
                     for n, s, t in zip(names, streams, timings)]
        else:
            answers = [s.result.error or s.result.text for s in streams]
            ref = names.index(BASE_NAME) if BASE_NAME in names else 0  # the base's answer, else the first column's
            shown = [answer_column(s.result.adapter, marked(a, None if i == ref else answers[ref]), t, True)
                     for i, (s, a, t) in enumerate(zip(streams, answers, timings))]
        yield [gr.HTML(value=v, visible=True) for v in shown] + [gr.HTML(visible=False)] * (MAX_COMPARE - len(names))

    every.change(pick_all, every, picked, api_visibility="private")
    add.click(add_mix_line, [mixes, spelling], mixes, api_visibility="private")
    go.click(run, [picked, mixes, prompt, temperature, max_new, seed, tokens], columns, api_visibility="private")
    return [picked] + pickers


def _blind_tab(service: Service, choices, preferences: PreferenceLog) -> list:
    """Two answers in an order drawn at random, names hidden until the vote; votes go to `preferences`."""
    session = gr.State(None)  # a BlindSession, made on the session's first comparison
    gr.Markdown("Two adapters (or mixes) answer the same prompt; which is A and which is B is drawn at random and "
                "shown only after you vote. Votes are saved as preference data (TRL's prompt/chosen/rejected).")
    with gr.Row():
        first = gr.Dropdown(choices(), value=BASE_NAME, label="One adapter or mix", allow_custom_value=True, elem_id="ab-first")
        second = gr.Dropdown(choices(), value=None, label="The other", allow_custom_value=True, elem_id="ab-second")
    prompt = gr.Textbox(label="Prompt", elem_id="ab-prompt")
    with gr.Row():
        max_new = gr.Slider(1, service.config.limits.max_new_tokens, value=64, step=1, label="Max new tokens")
        seed = gr.Number(value=0, precision=0, label="Seed")
    go = gr.Button("Get two answers", variant="primary", elem_id="ab-go")
    with gr.Row():
        shown = [gr.HTML(elem_id=f"ab-answer-{side.lower()}", elem_classes=["ab-answer"]) for side in "AB"]
    with gr.Row():
        votes = {c: gr.Button(label, elem_id=f"ab-vote-{c.lower()}")
                 for c, label in zip(CHOICES, ("A is better", "B is better", "Tie"))}
    reveal = gr.Markdown(elem_id="ab-reveal")

    def answer(state: BlindSession | None, one: str | None, other: str | None, text: str, new, seed_value):
        if not text.strip():
            raise gr.Error("type a prompt first")
        state = state or BlindSession()
        try:
            order = state.draw(one or "", other or "")
            messages = [Message("user", text)]
            results = [s.wait() for s in service.compare(list(order), messages, sampling(0.0, 1.0, new, seed_value))]
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        failed = next((r.error for r in results if r.error), None)
        if failed:
            raise gr.Error(failed)
        state.show(messages, order, (results[0].text, results[1].text))
        return [state] + [blind_answer(side, r.text) for side, r in zip("AB", results)] + [""]

    def vote(state: BlindSession | None, choice: str):
        if state is None:
            raise gr.Error("get two answers first")
        try:
            state.vote(preferences, choice)
        except (ValueError, OSError) as err:
            raise gr.Error(str(err)) from err
        return state, state.reveal()

    go.click(answer, [session, first, second, prompt, max_new, seed], [session, *shown, reveal], api_visibility="private")
    for choice, button in votes.items():
        button.click(lambda state, c=choice: vote(state, c), session, [session, reveal], api_visibility="private")
    for picker in (first, second):
        picker.focus(lambda: gr.Dropdown(choices=choices()), None, picker, api_visibility="private")
    return [first, second]


def _train_tab(ui: gr.Blocks, runs: TrainingRuns | None, choices, pickers: list) -> None:
    """Pick or upload a dataset, see it validated, set r/alpha/lr/epochs, start, follow, stop.
    A finished run refreshes the registry and every adapter picker in the other tabs. A page
    loaded (or reloaded) while a run goes on follows it again; after one, it shows how it ended."""
    if runs is None:
        gr.Markdown("Training from the UI is off on this server (`python -m serve web` turns it on).")
        return
    with gr.Row():
        upload = gr.File(label="Upload a dataset (.jsonl, one chat per line)", file_types=[".jsonl"], type="filepath",
                         elem_id="train-upload")
        dataset = gr.Dropdown(dataset_choices(runs), value=None, label="or a file under the data roots", elem_id="train-dataset")
    checked = gr.Markdown(elem_id="train-validation")
    name = gr.Textbox(label="Adapter name", elem_id="train-name")
    with gr.Row():
        r = gr.Number(FALLBACK.r, precision=0, label="r (rank)", elem_id="train-r")
        alpha = gr.Number(FALLBACK.alpha, label="alpha", elem_id="train-alpha")
        lr = gr.Number(FALLBACK.lr, label="learning rate", elem_id="train-lr")
        epochs = gr.Number(FALLBACK.epochs, label="epochs", elem_id="train-epochs")
    source = gr.Markdown()
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop", elem_id="train-stop")
    status = gr.Markdown(elem_id="train-status")
    curve = gr.LinePlot(x="step", y="loss", label="Training loss", elem_id="train-loss", height=260)
    tail = gr.Textbox(label="Log", lines=6, max_lines=12, elem_id="train-log")

    def uploaded(temporary: str | None):
        """Gradio's temporary copy (named as the user's file) goes under the data roots."""
        if temporary is None:
            return gr.Dropdown()
        try:
            path = runs.save_upload(Path(temporary).name, Path(temporary).read_bytes())
        except (TrainingRunError, OSError) as err:
            raise gr.Error(str(err)) from err
        return gr.Dropdown(choices=dataset_choices(runs), value=str(path))

    def picked(path: str | None, current_name: str):
        if not path:
            return "", current_name, gr.Number(), gr.Number(), gr.Number(), gr.Number(), ""
        view = dataset_view(runs, path, current_name)
        return view.validation, view.name, view.settings.r, view.settings.alpha, view.settings.lr, view.settings.epochs, view.source

    def train(path: str | None, adapter: str, rank, a, rate, n):
        if not path:
            raise gr.Error("choose or upload a dataset first")
        try:
            run = runs.start(adapter.strip(), path, int(rank), float(a), float(rate), float(n))
        except ValueError as err:  # TrainingRunError, a bad adapter name: shown as they are
            raise gr.Error(str(err)) from err
        yield from follow(run)

    def follow(run):
        for progress in runs.events(run):
            yield [progress_text(progress), _frame(progress), "\n".join(progress.log_tail)] + [gr.update()] * len(pickers)
        final = runs.wait(run)  # the registry has been refreshed by then (on_finished)
        yield [progress_text(final), _frame(final), "\n".join(final.log_tail)] + \
              [gr.update(choices=choices()) for _ in pickers]

    def reattach():
        run = runs.latest()
        if run is None:
            yield [gr.update()] * (3 + len(pickers))
            return
        yield from follow(run)

    def halt():
        run = runs.latest()
        if run is None:
            raise gr.Error("no training run to stop")
        return progress_text(runs.stop(run))

    upload.upload(uploaded, upload, dataset, api_visibility="private")
    dataset.change(picked, [dataset, name], [checked, name, r, alpha, lr, epochs, source], api_visibility="private")
    dataset.focus(lambda: gr.Dropdown(choices=dataset_choices(runs)), None, dataset, api_visibility="private")
    start.click(train, [dataset, name, r, alpha, lr, epochs], [status, curve, tail, *pickers], api_visibility="private")
    stop.click(halt, None, status, api_visibility="private")
    ui.load(reattach, None, [status, curve, tail, *pickers], api_visibility="private")


def _frame(progress):
    import pandas as pd  # gradio's own dependency: what its plots take

    rows = loss_rows(progress)
    # Typed columns even while empty: the plot decides from the first frame whether an axis is numeric.
    return pd.DataFrame({"step": pd.Series([r["step"] for r in rows], dtype="int64"),
                         "loss": pd.Series([r["loss"] for r in rows], dtype="float64")})


def _stream_columns(names, texts, timings, iterators):
    """Round-robin over the streams, yielding every column's text so far after each new piece."""
    pending = list(range(len(names)))
    while pending:
        for i in list(pending):
            piece = next(iterators[i], None)
            if piece is None:
                pending.remove(i)
                continue
            texts[i] += piece
        yield [gr.HTML(value=answer_column(n, html.escape(t), tm, False), visible=True) for n, t, tm in zip(names, texts, timings)] + \
              [gr.HTML(visible=False)] * (MAX_COMPARE - len(names))


def _adapters_tab(service: Service, preferences: PreferenceLog) -> None:
    def table():
        return adapter_table(service)

    def names():
        return [r.name for r in service.adapter_rows() if r.name != BASE_NAME]

    grid = gr.Dataframe(table(), headers=ADAPTER_HEADERS, interactive=False, elem_id="adapters-table", wrap=True)
    with gr.Row():
        selected = gr.Dropdown(names(), label="Adapter", value=None, scale=3, elem_id="adapters-pick")
        refresh = gr.Button("Refresh")
        unload = gr.Button("Unload from device")
    curve = gr.Image(label="Loss curve", type="filepath", height=300)
    note = gr.Markdown()
    def matrix_view():
        """The latest `make eval` matrix, hidden until there is one (read again on every refresh)."""
        found = service.eval_matrix()
        if found is None:
            return gr.Dataframe(visible=False)
        headers, rows = found
        return gr.Dataframe(value=rows, headers=headers, visible=True)

    found = service.eval_matrix()
    matrix = gr.Dataframe(found[1] if found else None, headers=found[0] if found else None, interactive=False,
                          elem_id="eval-matrix", visible=found is not None,
                          label="Adapter x task matrix: exact match from `make eval`; * marks each adapter's own task")

    def do_refresh():
        service.refresh()
        return table(), gr.Dropdown(choices=names()), matrix_view()

    def do_unload(name: str | None):
        if not name:
            raise gr.Error("choose an adapter")
        done = service.unload(name)
        return table(), f"{name} moved to host memory" if done else f"{name} was not on the device"

    versions, gate, regressed, promote_to, pointers = _versions_view()
    votes = gr.Dataframe(_votes(preferences), headers=PREFERENCE_HEADERS, interactive=False, elem_id="preference-summary",
                         label=f"Blind A/B votes per adapter pair ({preferences.path})")

    def show_versions(name: str | None):
        try:
            view = versions_view(service, name)
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        return view.rows, view.gate, view.regressed, gr.Dropdown(choices=view.versions, value=None)

    def move(name: str | None, version: str | None, action: str):
        try:
            moved = move_pointer(service, name, version, action)
        except REFUSED + (NoVersionError,) as err:
            raise gr.Error(str(err)) from err
        return (moved, *show_versions(name), table())

    version_outputs = [versions, gate, regressed, promote_to]
    selected.change(show_versions, selected, version_outputs, api_visibility="private")
    for button, action in ((pointers[0], "promote"), (pointers[1], "rollback")):
        button.click(lambda n, v, a=action: move(n, v, a), [selected, promote_to],
                     [pointers[2], *version_outputs, grid], api_visibility="private")
    selected.change(lambda name: loss_curve(service, name), selected, curve, api_visibility="private")
    def tick(name: str | None):
        """What changes by itself: new adapters, a new eval matrix, votes, a version the gate decided on."""
        return (table(), matrix_view(), _votes(preferences), *show_versions(name)[:3])

    refreshed = [grid, matrix, votes, versions, gate, regressed]
    refresh.click(do_refresh, None, [grid, selected, matrix], api_visibility="private").then(
        tick, selected, refreshed, api_visibility="private")
    unload.click(do_unload, selected, [grid, note], api_visibility="private")
    gr.Timer(5).tick(tick, selected, refreshed, api_visibility="private")


def _versions_view():
    """The chosen adapter's versions, the gate's last decision and the pointer buttons (wired by the caller)."""
    gr.Markdown("### Versions")
    versions = gr.Dataframe(headers=VERSION_HEADERS, interactive=False, elem_id="adapter-versions", wrap=True,
                            label="Stored versions, newest first (address one as name@version)")
    gate = gr.Markdown(elem_id="gate-report")
    regressed = gr.Dataframe(headers=REGRESSED_HEADERS, interactive=False, elem_id="gate-regressed", wrap=True,
                             label="Golden prompts that regressed (live right, new wrong)")
    with gr.Row():
        promote_to = gr.Dropdown([], value=None, label="Version to promote (empty: the candidate)", elem_id="promote-version", scale=3)
        promote = gr.Button("Promote", variant="primary", elem_id="adapters-promote")
        rollback = gr.Button("Roll back", elem_id="adapters-rollback")
    moved = gr.Markdown(elem_id="adapters-pointers")
    return versions, gate, regressed, promote_to, (promote, rollback, moved)


def _votes(preferences: PreferenceLog) -> list[list]:
    try:
        return preference_rows(preferences)
    except (OSError, ValueError) as err:  # a damaged file: the table says where, and the tab keeps working
        return [[f"votes not readable: {err}"] + [""] * (len(PREFERENCE_HEADERS) - 1)]


def _api_endpoints(service: Service) -> None:
    """Named endpoints for gradio_client: `/chat` and `/compare`."""

    def chat(adapter: str, message: str, system: str = "", temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 64, seed: int | None = None) -> str:
        """One reply from one adapter ('base' for none)."""
        try:
            result = service.chat(adapter, conversation(system, [{"role": "user", "content": message}]),
                                  sampling(temperature, top_p, max_new_tokens, seed)).wait()
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        if result.error:
            raise gr.Error(result.error)
        return result.text

    def compare(prompt: str, adapters: list[str], temperature: float = 0.0, max_new_tokens: int = 64, seed: int = 0) -> list[str]:
        """The prompt to each adapter in one mixed batch; the answers in the same order."""
        try:
            streams = service.compare(adapters, [Message("user", prompt)], sampling(temperature, 1.0, max_new_tokens, seed))
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        results = [s.wait() for s in streams]
        return [r.error or r.text for r in results]

    gr.api(chat, api_name="chat")
    gr.api(compare, api_name="compare")
