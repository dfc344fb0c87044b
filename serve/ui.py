"""The Gradio web UI: Chat, Compare and Adapters tabs. The only module that imports gradio.

Every action calls `serve.service.Service`; nothing here holds model or adapter state. The
conversation lives in a per-session gr.State as (role, content, adapter) turns, so the chat
history shows which adapter wrote each reply, and switching adapters mid-conversation is allowed.
"""

from __future__ import annotations

import html
import secrets
import time

import gradio as gr

from adapters import Message
from serve.engine import SamplingParams
from serve.registry import BASE_NAME, UnknownAdapterError
from serve.service import MAX_COMPARE, BusyError, Service, Timing, divergence, timed

TITLE = "loraswap: one 4-bit base, many QLoRA adapters"
REFUSED = (BusyError, UnknownAdapterError, ValueError)
"""What a request can be refused with before it runs (a full server, an unknown adapter, a bad
parameter or prompt: `serve.engine.RequestError` is a ValueError); the UI shows it as an error."""


def _params(temperature: float, top_p: float, max_new_tokens: float, seed: float | None = None) -> SamplingParams:
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                          seed=None if seed in (None, "") else int(seed))


def _messages(system: str, turns: list[dict]) -> list[Message]:
    prefix = [Message("system", system)] if system.strip() else []
    return prefix + [Message(t["role"], t["content"]) for t in turns]


def _display(turns: list[dict]) -> list[dict]:
    """The chatbot's view: each reply labelled with the adapter that wrote it."""
    shown = []
    for turn in turns:
        if turn["role"] == "assistant":
            shown.append({"role": "assistant", "content": f"**[{turn['adapter']}]** {turn['content']}"})
        else:
            shown.append({"role": "user", "content": turn["content"]})
    return shown


def marked(answer: str, reference: str | None) -> str:
    """HTML of an answer with the part after its first departure from the reference highlighted."""
    if reference is None:
        return html.escape(answer)
    at = divergence(reference, answer)
    if at is None:
        return html.escape(answer) + " <small>(same as reference)</small>"
    words = answer.split()
    same, rest = " ".join(words[:at]), " ".join(words[at:])
    return f"{html.escape(same)} <mark title='first departure from the reference'>{html.escape(rest) or '(ends here)'}</mark>"


def build_ui(service: Service) -> gr.Blocks:
    active: dict[str, list] = {}  # session -> its running streams, for the stop button

    def choices() -> list[tuple[str, str]]:
        return [(service.choice_label(name), name) for name in service.model_names()]

    with gr.Blocks(title=TITLE) as ui:
        gr.Markdown(f"## {TITLE}")
        with gr.Tab("Chat"):
            _chat_tab(service, choices, active)
        with gr.Tab("Compare"):
            _compare_tab(service, choices, active)
        with gr.Tab("Adapters"):
            _adapters_tab(service)
        _api_endpoints(service)
    return ui


def mount_ui(app, service: Service, access) -> object:
    """Mount the UI at / on the API's FastAPI app, behind a login when there are logins or an API key.

    Gradio's queue gets the service's size limit too: beyond it the UI answers 'queue full'.
    """
    ui = build_ui(service)
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


def _chat_tab(service: Service, choices, active: dict) -> None:
    turns = gr.State([])
    with gr.Row():
        adapter = gr.Dropdown(choices(), value=BASE_NAME, label="Adapter", elem_id="chat-adapter", scale=3)
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p")
        max_new = gr.Slider(1, service.config.limits.max_new_tokens, value=64, step=1, label="Max new tokens")
    system = gr.Textbox(label="System prompt", lines=1, placeholder="optional")
    chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=380)
    message = gr.Textbox(label="Message", elem_id="chat-message", placeholder="Type and press Enter")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        stop = gr.Button("Stop", elem_id="chat-stop")
        retry = gr.Button("Retry")
        clear = gr.Button("Clear")

    def respond(history: list[dict], name: str, system_prompt: str, temp, p, new, request: gr.Request):
        """Stream the reply to the last user turn into a new assistant turn."""
        reply = {"role": "assistant", "content": "", "adapter": name}
        try:
            stream = service.chat(name, _messages(system_prompt, history), _params(temp, p, new))
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        active[request.session_hash] = [stream]
        try:
            for piece in stream:
                reply["content"] += piece
                yield history + [reply], _display(history + [reply])
        finally:
            stream.cancel()
            active.pop(request.session_hash, None)
        if stream.result.error:
            raise gr.Error(stream.result.error)
        reply["content"] = stream.result.text
        yield history + [reply], _display(history + [reply])

    def add_user(history: list[dict], text: str):
        if not text.strip():
            raise gr.Error("type a message first")
        history = history + [{"role": "user", "content": text, "adapter": None}]
        return history, _display(history), ""

    def drop_last_reply(history: list[dict]):
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if not history:
            raise gr.Error("nothing to retry")
        return history, _display(history)

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
    adapter.focus(lambda: gr.Dropdown(choices=choices()), None, adapter, api_visibility="private")


def _compare_tab(service: Service, choices, active: dict) -> None:
    with gr.Row():
        picked = gr.CheckboxGroup(choices(), value=[BASE_NAME], label=f"Adapters (2 to {MAX_COMPARE})", elem_id="compare-adapters", scale=4)
        every = gr.Checkbox(label="All", elem_id="compare-all")
    prompt = gr.Textbox(label="Prompt", elem_id="compare-prompt")
    with gr.Row():
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature")
        max_new = gr.Slider(1, service.config.limits.max_new_tokens, value=64, step=1, label="Max new tokens")
        seed = gr.Number(value=0, precision=0, label="Seed")
    go = gr.Button("Compare", variant="primary", elem_id="compare-go")
    with gr.Row():
        columns = [gr.HTML(visible=False, elem_id=f"compare-col-{i}", elem_classes=["compare-col"]) for i in range(MAX_COMPARE)]

    def pick_all(checked: bool):
        names = service.model_names()[:MAX_COMPARE] if checked else [BASE_NAME]
        return gr.CheckboxGroup(choices=choices(), value=names)

    def column(name: str, text: str, timing: Timing, done: bool) -> str:
        first = f"{timing.first_token_s:.2f}" if timing.first_token_s is not None else "-"
        stats = (f"{timing.tokens} tokens, {timing.tokens_per_s:.1f} tok/s, first token {first} s, total {timing.total_s:.2f} s"
                 if done else "generating...")
        return f"<div class='compare-answer'><h4>{html.escape(name)}</h4><p><small>{stats}</small></p><p>{text}</p></div>"

    def run(names: list[str], text: str, temp, new, seed_value, request: gr.Request):
        if not 2 <= len(names) <= MAX_COMPARE:
            raise gr.Error(f"choose 2 to {MAX_COMPARE} adapters")
        if not text.strip():
            raise gr.Error("type a prompt first")
        try:
            streams = service.compare(names, [Message("user", text)], _params(temp, 1.0, new, seed_value))
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        active[request.session_hash] = streams
        started, timings = time.perf_counter(), [Timing() for _ in names]
        texts = [""] * len(names)
        iterators = [timed(s, started, t) for s, t in zip(streams, timings)]
        try:
            yield from _stream_columns(names, texts, timings, iterators, column)
        finally:
            for s in streams:
                s.cancel()
            active.pop(request.session_hash, None)
        answers = [s.result.error or s.result.text for s in streams]
        ref = names.index(BASE_NAME) if BASE_NAME in names else 0  # the base's answer, else the first column's
        shown = [column(n, marked(a, None if i == ref else answers[ref]), t, True)
                 for i, (n, a, t) in enumerate(zip(names, answers, timings))]
        yield [gr.HTML(value=v, visible=True) for v in shown] + [gr.HTML(visible=False)] * (MAX_COMPARE - len(names))

    every.change(pick_all, every, picked, api_visibility="private")
    go.click(run, [picked, prompt, temperature, max_new, seed], columns, api_visibility="private")


def _stream_columns(names, texts, timings, iterators, column):
    """Round-robin over the streams, yielding every column's text so far after each new piece."""
    pending = list(range(len(names)))
    while pending:
        for i in list(pending):
            piece = next(iterators[i], None)
            if piece is None:
                pending.remove(i)
                continue
            texts[i] += piece
        yield [gr.HTML(value=column(n, html.escape(t), tm, False), visible=True) for n, t, tm in zip(names, texts, timings)] + \
              [gr.HTML(visible=False)] * (MAX_COMPARE - len(names))


def _adapters_tab(service: Service) -> None:
    headers = ["name", "task", "base", "rank", "alpha", "trainable share", "eval metric (base -> adapter)", "trained", "status"]

    def table():
        return [[r.name, r.task, r.base, r.rank or "", r.alpha or "", f"{r.trainable_share:.3%}" if r.trainable_share else "",
                 r.metric, r.trained, r.status] for r in service.adapter_rows()]

    def names():
        return [r.name for r in service.adapter_rows() if r.name != BASE_NAME]

    grid = gr.Dataframe(table(), headers=headers, interactive=False, elem_id="adapters-table", wrap=True)
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

    def show_curve(name: str | None):
        row = next((r for r in service.adapter_rows() if r.name == name), None)
        return str(row.loss_curve) if row and row.loss_curve else None

    def do_refresh():
        service.refresh()
        return table(), gr.Dropdown(choices=names()), matrix_view()

    def do_unload(name: str | None):
        if not name:
            raise gr.Error("choose an adapter")
        done = service.unload(name)
        return table(), f"{name} moved to host memory" if done else f"{name} was not on the device"

    selected.change(show_curve, selected, curve, api_visibility="private")
    refresh.click(do_refresh, None, [grid, selected, matrix], api_visibility="private")
    unload.click(do_unload, selected, [grid, note], api_visibility="private")
    gr.Timer(5).tick(lambda: (table(), matrix_view()), None, [grid, matrix], api_visibility="private")  # new adapters appear by themselves


def _api_endpoints(service: Service) -> None:
    """Named endpoints for gradio_client: `/chat` and `/compare`."""

    def chat(adapter: str, message: str, system: str = "", temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 64, seed: int | None = None) -> str:
        """One reply from one adapter ('base' for none)."""
        try:
            result = service.chat(adapter, _messages(system, [{"role": "user", "content": message}]),
                                  _params(temperature, top_p, max_new_tokens, seed)).wait()
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        if result.error:
            raise gr.Error(result.error)
        return result.text

    def compare(prompt: str, adapters: list[str], temperature: float = 0.0, max_new_tokens: int = 64, seed: int = 0) -> list[str]:
        """The prompt to each adapter in one mixed batch; the answers in the same order."""
        try:
            streams = service.compare(adapters, [Message("user", prompt)], _params(temperature, 1.0, max_new_tokens, seed))
        except REFUSED as err:
            raise gr.Error(str(err)) from err
        results = [s.wait() for s in streams]
        return [r.error or r.text for r in results]

    gr.api(chat, api_name="chat")
    gr.api(compare, api_name="compare")
