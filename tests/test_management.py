"""Runtime adapter loading over HTTP (serve/management.py), live on a loopback port: vLLM's shapes,
the API key, confinement to the adapter roots (also through '..' and symlinks), the store's own
compatibility check, and unloading that leaves every file where it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from adapters.compat import AdapterCheckError, check_adapter
from adapters.store import ADAPTER_CONFIG
from serve.management import AdapterRoots, FleetSettings, PathRefused
from serve.server import AccessConfig
from tests.conftest import LiveServer, free_port, start_service

KEY = "management-key"
CAT = [{"role": "user", "content": "Color of cat?"}]


@pytest.fixture(scope="module")
def roots(tmp_path_factory, two_adapters) -> SimpleNamespace:
    """An extra adapter root holding a copy of 'colors' ('tint'), one with a config that lies about
    its rank ('bent'), and a symlink to a copy outside every root ('escape')."""
    colors = (two_adapters.root / "colors").resolve()
    extra = tmp_path_factory.mktemp("team-adapters")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(colors, extra / "tint")
    shutil.copytree(colors, outside / "stray")
    (extra / "escape").symlink_to(outside / "stray", target_is_directory=True)
    shutil.copytree(colors, extra / "bent")
    config = json.loads((extra / "bent" / ADAPTER_CONFIG).read_text())
    (extra / "bent" / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": config["r"] // 2}))
    (extra / ".hidden").mkdir()
    shutil.copytree(colors, extra / ".hidden" / "tint")
    return SimpleNamespace(extra=extra, outside=outside, store=two_adapters.root)


@pytest.fixture(scope="module")
def live(tiny_base, two_adapters, roots):
    service = start_service(tiny_base, two_adapters)
    fleet = FleetSettings(allow_runtime_loading=True, adapter_roots=(str(roots.extra),))
    with LiveServer(service, AccessConfig("127.0.0.1", free_port(), (), KEY), fleet=fleet) as server:
        yield server


@pytest.fixture
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)


def load(client: openai.OpenAI, name: str, path, **extra) -> str:
    return client.post("/load_lora_adapter", cast_to=str, body={"lora_name": name, "lora_path": str(path), **extra})


def unload(client: openai.OpenAI, name: str) -> str:
    return client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": name})


def reply(client: openai.OpenAI, model: str) -> str:
    answer = client.chat.completions.create(model=model, messages=CAT, temperature=0, max_tokens=8)
    return answer.choices[0].message.content


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_loaded_adapter_answers_survives_scans_and_after_unload_is_a_404_with_its_files_kept(live, client, roots):
    before = folder_files(roots.extra / "tint")
    assert load(client, "tint", roots.extra / "tint") == "Success: LoRA adapter 'tint' added successfully."
    card = next(m for m in client.models.list().data if m.id == "tint")
    assert (card.parent, card.root) == ("base", str((roots.extra / "tint").resolve()))
    assert reply(client, "tint") == reply(client, "colors") == "red"  # a copy of 'colors' answers as it does
    live.service.refresh()  # the store's scan knows nothing of it, and leaves it served
    assert "tint" in [m.id for m in client.models.list().data]
    assert unload(client, "tint") == "Success: LoRA adapter 'tint' removed successfully."
    with pytest.raises(openai.NotFoundError) as err:
        reply(client, "tint")
    assert err.value.body["code"] == "model_not_found"
    assert folder_files(roots.extra / "tint") == before  # nothing on disk was touched
    assert reply(client, "colors") == "red"


def test_a_runtime_loaded_adapter_mixes_like_the_adapter_it_copies(client, roots):
    """A mix can name an adapter loaded at runtime: 'tint' (a copy of 'colors') at a strength beside
    'sizes' answers as 'colors' in the same mix, alone on the server (the same weights, the same
    parts in the same order: the same products); once unloaded, the mix is a 404 naming it."""
    assert load(client, "tint3", roots.extra / "tint").startswith("Success")
    try:
        for mix in ("{}*0.5+sizes", "sizes+{}*-0.3", "{}*1"):
            assert reply(client, mix.format("tint3")) == reply(client, mix.format("colors")), mix
        assert reply(client, "tint3*0.5+sizes") != reply(client, "sizes")  # the runtime part counts
    finally:
        unload(client, "tint3")
    with pytest.raises(openai.NotFoundError) as err:
        reply(client, "tint3*0.5+sizes")
    assert "tint3" in err.value.body["message"]


def test_a_path_relative_to_the_store_and_one_through_dotdot_inside_the_roots_load(client, roots):
    assert load(client, "hue", "colors").startswith("Success")  # the store's published version of 'colors'
    assert load(client, "tint2", roots.extra / "bent" / ".." / "tint").startswith("Success")
    assert reply(client, "hue") == reply(client, "tint2") == "red"
    for name in ("hue", "tint2"):
        unload(client, name)


@pytest.mark.parametrize("route", ["outside", "dotdot", "symlink", "hidden"])
def test_a_path_that_leads_out_of_the_roots_is_a_403_that_says_why(client, roots, route):
    path = {"outside": roots.outside / "stray",
            "dotdot": f"{roots.extra}/../{roots.outside.name}/stray",
            "symlink": roots.extra / "escape",
            "hidden": roots.extra / ".hidden" / "tint"}[route]
    with pytest.raises(openai.PermissionDeniedError) as err:
        load(client, "stray", path)
    body = err.value.body
    assert (body["code"], body["param"]) == ("lora_path_outside_roots", "lora_path")
    expected = "hidden folder '.hidden'" if route == "hidden" else f"resolves to {(roots.outside / 'stray').resolve()}"
    assert expected in body["message"]
    assert "stray" not in [m.id for m in client.models.list().data]


def test_confinement_resolves_symlinks_and_dotdot_before_comparing(roots):
    confined = AdapterRoots.of(roots.store, [str(roots.extra)])
    assert confined.confine(str(roots.extra / "bent" / ".." / "tint")) == (roots.extra / "tint").resolve()
    assert confined.confine("colors") == (roots.store / "colors").resolve()  # relative: to the store
    for path in (roots.extra / "escape", roots.extra / "..", roots.extra, "/etc/passwd", "../../.."):
        with pytest.raises(PathRefused):
            confined.confine(str(path))
    with pytest.raises(ValueError, match="NUL"):
        confined.confine(f"{roots.extra}/tint\x00")


def test_an_incompatible_folder_is_refused_with_the_checkers_reason(live, client, roots):
    with pytest.raises(AdapterCheckError) as checked:
        check_adapter(roots.extra / "bent", live.service.registry.base)
    with pytest.raises(openai.BadRequestError) as err:
        load(client, "bent", roots.extra / "bent")
    assert err.value.body["code"] == "adapter_rejected"
    assert str(checked.value) in err.value.body["message"]
    assert "bent" not in [m.id for m in client.models.list().data]


def test_names_taken_unknown_and_the_stores_own_are_refused_as_vllm_refuses_them(client, roots):
    load(client, "tint", roots.extra / "tint")
    try:
        with pytest.raises(openai.BadRequestError, match="has already been loaded"):
            load(client, "tint", roots.extra / "tint")
        assert load(client, "tint", "sizes", load_inplace=True).startswith("Success")  # replaced in place
        assert reply(client, "tint") != "red"  # now the 'sizes' adapter answers
    finally:
        unload(client, "tint")
    with pytest.raises(openai.BadRequestError, match="served from the adapter store already"):
        load(client, "colors", roots.extra / "tint")
    with pytest.raises(openai.BadRequestError) as err:
        load(client, "../tint", roots.extra / "tint")
    assert err.value.body["param"] == "lora_name"
    with pytest.raises(openai.NotFoundError, match="no adapter folder at"):
        load(client, "ghost", roots.extra / "ghost")
    with pytest.raises(openai.NotFoundError, match="The lora adapter 'ghost' cannot be found."):
        unload(client, "ghost")
    with pytest.raises(openai.BadRequestError, match="remove it from the store") as err:
        unload(client, "colors")
    assert err.value.body["code"] == "adapter_in_store"
    assert reply(client, "colors") == "red"


def test_the_endpoints_need_the_api_key_and_post(live, roots):
    body = {"lora_name": "tint", "lora_path": str(roots.extra / "tint")}
    wrong = {"Authorization": "Bearer not-the-key"}
    for route in ("load_lora_adapter", "unload_lora_adapter"):
        assert httpx.post(f"{live.url}/v1/{route}", json=body).status_code == 401
        refused = httpx.post(f"{live.url}/v1/{route}", json=body, headers=wrong)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    get = httpx.get(f"{live.url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {KEY}"})
    assert (get.status_code, get.headers["allow"]) == (405, "POST")
    bad = httpx.post(f"{live.url}/v1/load_lora_adapter", content=b"{", headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]["message"]


def test_without_the_flag_the_endpoints_are_a_404_naming_it(tiny_base, two_adapters, roots):
    service = start_service(tiny_base, two_adapters)
    with LiveServer(service, AccessConfig("127.0.0.1", free_port(), (), KEY)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        for call in (lambda: load(client, "tint", roots.extra / "tint"), lambda: unload(client, "colors")):
            with pytest.raises(openai.NotFoundError, match="--allow-runtime-loading") as err:
                call()
            assert err.value.body["code"] == "runtime_loading_disabled"
        assert [m.id for m in client.models.list().data] == ["base", "colors", "sizes"]


def test_models_carry_vllms_parent_and_root(live, client, tiny_base, roots):
    cards = {m.id: m for m in client.models.list().data}
    assert (cards["base"].parent, cards["base"].root) == (None, str(tiny_base))
    assert (cards["colors"].parent, cards["colors"].root) == ("base", str((roots.store / "colors").resolve()))
    assert cards["colors"].max_model_len == live.service.base.model.config.max_position_embeddings


def test_a_root_that_is_no_folder_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="--adapter-roots .*: not a folder"):
        FleetSettings(adapter_roots=(str(tmp_path / "missing"),))
